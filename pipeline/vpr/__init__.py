"""Place-recognition datasets as the field lays them out: UTM ↔ WGS 84, the @-separated file
names, positives in UTM metres, CosPlace classes (UTM cell × heading)."""

__all__: list[str] = []

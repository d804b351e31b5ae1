"""The Zarr embedding store (geopipe.schemas.store): reader, writer, on-disk format, verification, rejects."""

__all__: list[str] = []

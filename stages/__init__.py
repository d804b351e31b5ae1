"""geopipe stages: one module per pipeline step; frozen config in, result out."""

__all__: list[str] = []

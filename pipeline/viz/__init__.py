"""Pictures: density grids on the sphere, maps, calibration plots, the land outline asset."""

__all__: list[str] = []

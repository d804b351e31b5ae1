"""Maths on the unit sphere S²: coordinates, exp/log maps, von Mises–Fisher, blocked nearest neighbours."""

__all__: list[str] = []

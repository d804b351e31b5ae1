"""Retrieval against a geotagged database of embeddings: exact top-K search, query/database
splits, a spherical kernel density of the neighbours, viewpoint pairs."""

__all__: list[str] = []

"""Embedding inspection, training-free and cheap: spherical k-means prototypes with geo-purity,
nearest-neighbour galleries of probe embeddings, and linear (ridge) probes from embeddings to
store metadata (docs/retrieval_uncertainty.md, "Embedding inspection")."""

__all__: list[str] = []

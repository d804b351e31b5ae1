"""Post-hoc uncertainty of frozen embeddings: generalised-Gaussian losses, BayesCap heads,
MC-dropout variance, and training-free scores from retrieval or generative densities."""

__all__: list[str] = []

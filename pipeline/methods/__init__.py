"""The generative method family (registry, flow/diffusion fields, closed-form vMF baselines)."""

__all__: list[str] = []

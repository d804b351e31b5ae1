"""Training: optimiser, EMA, learning-rate schedule and the step loop."""

__all__: list[str] = []

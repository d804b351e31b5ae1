"""Inference: the predictor (sampling, likelihood) and localizability."""

__all__: list[str] = []

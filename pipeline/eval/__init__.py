"""Evaluation: geolocation metrics, PRDC, calibration, admin accuracy, comparison tables."""

__all__: list[str] = []

"""geopipe library: geometry, schedules, networks, objectives, samplers, likelihoods, metrics, stores."""

__all__: list[str] = []

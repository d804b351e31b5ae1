"""geopipe flows: Prefect flows and the geopipe command line."""

__all__: list[str] = []

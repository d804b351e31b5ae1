"""On-disk contracts of geopipe, as code (imports nothing from the project).

* :mod:`geopipe.schemas.store` — the Zarr v3 embedding store.
* :mod:`geopipe.schemas.rejects` — the rejects table written beside every data-plane stage.
* :mod:`geopipe.schemas.predictions` — the Parquet predictions table.
* :mod:`geopipe.schemas.checkpoint` — the checkpoint directory (safetensors + JSON).
"""

__all__: list[str] = []

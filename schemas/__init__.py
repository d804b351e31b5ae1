"""On-disk contracts of geopipe, as code (imports nothing from the project).

* :mod:`schemas.store` — the Zarr v3 embedding store.
* :mod:`schemas.rejects` — the rejects table written beside every data-plane stage.
* :mod:`schemas.predictions` — the Parquet predictions table.
* :mod:`schemas.checkpoint` — the checkpoint directory (safetensors + JSON).
"""

__all__: list[str] = []

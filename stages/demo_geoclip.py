"""Geoclip-world stage: ``geopipe demo-data OUT --world geoclip`` — a realistic offline benchmark
world written straight as embedding stores (docs/geoclip_world.md).

Needs the optional ``geoclip`` package (``pip install 'geopipe-geolocation[geoclip]'`` or ``pip install --no-deps
geoclip``): its location-encoder weights and 100K MP-16 GPS gallery are read as files (tensors
only, no code of the package runs, nothing is downloaded).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from geopipe.pipeline.world.geoclip import GeoclipWorldConfig

__all__ = ["GeoclipDataConfig", "run_geoclip_data"]


@dataclass(frozen=True)
class GeoclipDataConfig:
    """out: folder of the stores; world: sizes, seed and recipe; progress: show the encoding progress."""

    out: str
    world: GeoclipWorldConfig = field(default_factory=GeoclipWorldConfig)
    progress: bool = True


def run_geoclip_data(cfg: GeoclipDataConfig):
    """Write (or find up to date) the geoclip world → :class:`~geopipe.pipeline.world.geoclip_stores.GeoclipWorldResult`."""
    from geopipe.pipeline.core.provenance import provenance
    from geopipe.pipeline.world.geoclip_stores import write_geoclip_world
    from geopipe.pipeline.world.location_encoder import geoclip_dir, load_gallery, load_geoclip_encoder

    folder = geoclip_dir()
    return write_geoclip_world(cfg.out, cfg.world, load_geoclip_encoder(folder), load_gallery(folder), progress=cfg.progress,
                               created_by=provenance())

"""Demo-data stage: write the offline demo world (WebDataset shards) for ``make demo`` and tests."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from geopipe.pipeline.ingest.demo_world import DemoWorldConfig, write_demo_world

__all__ = ["DemoDataConfig", "DemoDataResult", "run_demo_data"]


@dataclass(frozen=True)
class DemoDataConfig:
    out: str
    n_train: int = 3000
    n_test: int = 500
    shard_size: int = 500
    image_size: int = 64
    seed: int = 0
    views_per_place: int = 1  # > 1: a multi-view world (place_id, capture_id, heading_deg per photo)
    test_views_per_place: int | None = None  # the test split's own (None: views_per_place)


@dataclass(frozen=True)
class DemoDataResult:
    out: str
    n_train: int
    n_test: int
    shards: tuple[str, ...]
    skipped: bool  # True when identical shards were already there


def _existing(cfg: DemoDataConfig) -> tuple[str, ...]:
    return tuple(sorted(glob.glob(os.path.join(cfg.out, "*.tar"))))


def run_demo_data(cfg: DemoDataConfig) -> DemoDataResult:
    """Write the demo world to ``cfg.out`` unless a complete one with the same settings is there."""
    stamp = os.path.join(cfg.out, "demo_world.json")
    settings = repr(cfg)
    if cfg.views_per_place == 1:  # stamps of single-view worlds read as before the option existed
        settings = settings.replace(", views_per_place=1, test_views_per_place=None)", ")")
    if os.path.exists(stamp) and open(stamp).read() == settings:
        return DemoDataResult(cfg.out, cfg.n_train, cfg.n_test, _existing(cfg), True)
    os.makedirs(cfg.out, exist_ok=True)
    world = DemoWorldConfig(n_train=cfg.n_train, n_test=cfg.n_test, shard_size=cfg.shard_size, image_size=cfg.image_size, seed=cfg.seed,
                            views_per_place=cfg.views_per_place, test_views_per_place=cfg.test_views_per_place)
    write_demo_world(cfg.out, world)
    with open(stamp, "w") as fh:  # written last: a crash mid-write regenerates next time
        fh.write(settings)
    return DemoDataResult(cfg.out, cfg.n_train, cfg.n_test, _existing(cfg), False)

"""Demo-data stage: write the offline demo world (WebDataset shards) for ``make demo`` and tests."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

from geopipe.pipeline.world.demo_world import DemoWorldConfig, write_demo_world

__all__ = ["DemoDataConfig", "DemoDataResult", "run_demo_data", "write_demo_photos"]


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


def write_demo_photos(test_shards: str, out_dir: str, n: int = 8) -> list[str]:
    """Write the first ``n`` photos of the demo world's test split as plain JPEG files with their
    coordinates stripped (``photo_00.jpg`` …) — the unlabelled photos ``make demo`` geolocates.
    Existing files are kept. Returns the paths written or found; the truth stays in the shards."""
    from geopipe.pipeline.ingest.shards import iter_tar_samples, resolve_shards

    os.makedirs(out_dir, exist_ok=True)
    paths: list[str] = []
    for url in resolve_shards([test_shards]):
        for sample in iter_tar_samples(url):
            if len(paths) == n:
                return paths
            path = os.path.join(out_dir, f"photo_{len(paths):02d}.jpg")
            if not os.path.exists(path):
                with open(path + ".tmp", "wb") as fh:
                    fh.write(sample["jpg"])
                os.replace(path + ".tmp", path)
            paths.append(path)
    return paths

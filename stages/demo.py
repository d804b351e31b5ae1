"""Demo-data stage: write the offline demo world (WebDataset shards) for ``make demo`` and tests."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass

from geopipe.pipeline.world.demo_world import DemoWorldConfig, write_demo_world

__all__ = ["STAMP_SCHEMA", "DemoDataConfig", "DemoDataResult", "run_demo_data", "write_demo_photos"]


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


#: Schema id of the stamp ``demo_world.json`` beside a complete demo world.
STAMP_SCHEMA = "geopipe.demo_world/1"


def _stamp(cfg: DemoDataConfig) -> dict:
    """The stamp's JSON object: what the world was made from (its folder aside)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "out"}
    return {"schema": STAMP_SCHEMA, "settings": settings}


def _legacy_stamp(cfg: DemoDataConfig) -> str:
    """The stamp written before it was JSON: ``repr(cfg)`` (single-view worlds without the view options)."""
    settings = repr(cfg)
    if cfg.views_per_place == 1:
        settings = settings.replace(", views_per_place=1, test_views_per_place=None)", ")")
    return settings


def _stamp_matches(path: str, cfg: DemoDataConfig) -> bool:
    """True when the stamp at ``path`` records ``cfg``'s settings (a legacy repr stamp is upgraded to JSON)."""
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text == _legacy_stamp(cfg):
        _write_stamp(path, cfg)
        return True
    try:
        return json.loads(text) == _stamp(cfg)
    except ValueError:
        return False


def _write_stamp(path: str, cfg: DemoDataConfig) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(_stamp(cfg), fh, indent=2)
        fh.write("\n")
    os.replace(path + ".tmp", path)


def run_demo_data(cfg: DemoDataConfig) -> DemoDataResult:
    """Write the demo world to ``cfg.out`` unless a complete one with the same settings is there
    (``demo_world.json``, a JSON object ``{"schema", "settings"}`` written last)."""
    stamp = os.path.join(cfg.out, "demo_world.json")
    if _stamp_matches(stamp, cfg):
        return DemoDataResult(cfg.out, cfg.n_train, cfg.n_test, _existing(cfg), True)
    os.makedirs(cfg.out, exist_ok=True)
    world = DemoWorldConfig(n_train=cfg.n_train, n_test=cfg.n_test, shard_size=cfg.shard_size, image_size=cfg.image_size, seed=cfg.seed,
                            views_per_place=cfg.views_per_place, test_views_per_place=cfg.test_views_per_place)
    write_demo_world(cfg.out, world)
    _write_stamp(stamp, cfg)  # written last: a crash mid-write regenerates next time
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

"""Tests' synthetic multi-view world (not part of the library): places on a small grid, each
with a latent unit vector and several views whose embedding noise grows with a per-place
``difficulty`` (so a good uncertainty score should track it), written as an embedding store.

Every view carries ``place``, ``capture_id`` (one per view), ``heading_deg``, ``difficulty`` and
``split`` metadata. Places are ~``spacing_m`` apart; views of one place lie within ~5 m.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["SyntheticConfig", "synthetic_views", "write_synthetic_store"]


@dataclass(frozen=True)
class SyntheticConfig:
    """n_places places × views_per_place views, embedding dimension dim; view noise standard
    deviation per coordinate = (noise_min + difficulty·noise_span)/√dim with difficulty
    uniform in [0, 1]; test_fraction of the places are held out as queries (split "test");
    difficulty_signal shifts the first latent coordinate by signal·(difficulty − ½), so the
    difficulty can be read off an embedding (as content predicts difficulty in real images)."""

    n_places: int = 400
    views_per_place: int = 5
    dim: int = 32
    noise_min: float = 0.2
    noise_span: float = 1.6
    spacing_m: float = 200.0
    origin: tuple[float, float] = (45.0, 7.6)
    test_fraction: float = 0.25
    difficulty_signal: float = 1.0
    seed: int = 0


def synthetic_views(cfg: SyntheticConfig = SyntheticConfig()) -> dict:
    """Arrays of the views: embeddings (N, dim) float32 unit, latlon (N, 2) degrees, keys (N,),
    place (N,) int, difficulty (N,) float, heading (N,) degrees, split (N,) str."""
    rng = np.random.default_rng(cfg.seed)
    side = math.ceil(math.sqrt(cfg.n_places))
    p = np.arange(cfg.n_places)
    dlat = cfg.spacing_m / 111_195.0
    dlon = dlat / math.cos(math.radians(cfg.origin[0]))
    centre = np.stack([cfg.origin[0] + (p // side) * dlat, cfg.origin[1] + (p % side) * dlon], axis=1)
    difficulty = rng.uniform(0.0, 1.0, cfg.n_places)
    latent = rng.normal(size=(cfg.n_places, cfg.dim)) / math.sqrt(cfg.dim)
    latent[:, 0] += cfg.difficulty_signal * (difficulty - 0.5)  # hard places look alike: the difficulty is visible
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    test_place = rng.uniform(size=cfg.n_places) < cfg.test_fraction
    v = cfg.views_per_place
    place = np.repeat(p, v)
    sd = (cfg.noise_min + difficulty[place] * cfg.noise_span) / math.sqrt(cfg.dim)
    emb = latent[place] + rng.normal(size=(place.size, cfg.dim)) * sd[:, None]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    jitter = rng.normal(scale=2.0 / 111_195.0, size=(place.size, 2))  # ~2 m
    return {
        "embeddings": emb.astype(np.float32),
        "latlon": centre[place] + jitter,
        "keys": np.array([f"p{pl:05d}_v{i % v}" for i, pl in enumerate(place)], dtype=object),
        "place": place,
        "difficulty": difficulty[place],
        "heading": (np.tile(np.arange(v), cfg.n_places) * 25.0 + rng.uniform(0, 10, place.size)) % 360.0,
        "split": np.where(test_place[place], "test", "train"),
    }


def write_synthetic_store(path: str, cfg: SyntheticConfig = SyntheticConfig(), label: str = "synthetic") -> dict:
    """Write :func:`synthetic_views` as a float32 normalised store at ``path``; returns the arrays."""
    views = synthetic_views(cfg)
    ident = {"name": label, "pretrained": None, "embed_dim": cfg.dim, "preprocess": {"source": "synthetic"},
             "fingerprint": f"synthetic-{label}-{cfg.dim}"}
    n = views["place"].size
    meta = {
        "place": [json.dumps(int(x)) for x in views["place"]],
        "capture_id": [json.dumps(f"c{i}") for i in range(n)],
        "heading_deg": [json.dumps(round(float(x), 3)) for x in views["heading"]],
        "difficulty": [json.dumps(round(float(x), 6)) for x in views["difficulty"]],
        "split": [json.dumps(str(x)) for x in views["split"]],
    }
    with StoreWriter.open(path, backbone=ident, embed_dim=cfg.dim, dtype="float32", normalize=True) as w:
        w.append_shard("synthetic://views", views["embeddings"], views["latlon"], list(views["keys"]), meta, [],
                       ShardStat(size=n, mtime=None))
    return views

"""Write the geoclip world (:mod:`geopipe.pipeline.world.geoclip`) as geopipe embedding stores.

``OUT/train.zarr``, ``val.zarr``, ``test.zarr`` and ``heldout.zarr`` (the held-out region), each
one shard ``geoclip-world:<split>`` written by :class:`~geopipe.pipeline.store.writer.StoreWriter`
(float16, normalised), with metadata split, radius_km, mixed, mix_weight, partner_lat/lon,
centre_lat/lon, place_id and gallery_index; the backbone identity names the recipe and its
parameters (:func:`~geopipe.pipeline.world.geoclip.world_label`), so stores of another
recipe never mix. ``OUT/cache/<encoder>-<gallery sha>.npy`` (float16, (G, D) unit encoder outputs)
with ``…-done.npy`` keeps the encoder outputs: a rerun with another seed or size encodes only
gallery points not seen before. ``OUT/geoclip_world.json`` stamps a finished world: the same
config again returns at once; another one replaces the four stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.world.geoclip import SPLITS, GeoclipWorldConfig, WorldPlan, config_dict, embed_world, plan_world, world_label
from geopipe.pipeline.world.location_encoder import encode_locations

__all__ = ["GeoclipWorldResult", "write_geoclip_world", "cached_unit_encodings"]

_STAMP = "geoclip_world.json"


@dataclass(frozen=True)
class GeoclipWorldResult:
    """Store paths per split, record counts, the backbone label, gallery points encoded by this
    run (0: all from the cache), seconds, and whether an identical world was already there."""

    out_dir: str
    stores: dict
    counts: dict
    label: str
    encoded: int
    seconds: float
    skipped: bool


def cached_unit_encodings(encoder, gallery: np.ndarray, needed: np.ndarray, cache_dir: str, progress: bool = True) -> tuple[np.ndarray, int]:
    """((G, D) float16 unit encoder outputs, valid at least on ``needed`` rows; gallery points encoded now)."""
    digest = hashlib.sha256(np.ascontiguousarray(gallery, dtype=np.float64).tobytes()).hexdigest()[:12]
    base = os.path.join(cache_dir, f"{encoder.name}-{digest}")
    g, d = gallery.shape[0], encoder.embed_dim
    try:
        table, done = np.load(base + ".npy"), np.load(base + "-done.npy")
        if table.shape != (g, d) or done.shape != (g,):
            raise ValueError("shape")
    except (OSError, ValueError):
        table, done = np.zeros((g, d), dtype=np.float16), np.zeros(g, dtype=bool)
    todo = needed[~done[needed]]
    if todo.size:
        with Progress(int(todo.size), "encode gallery", "point", enabled=progress) as bar:
            table[todo] = encode_locations(encoder, gallery[todo], progress=bar.update).astype(np.float16)
        done[todo] = True
        os.makedirs(cache_dir, exist_ok=True)
        for path, arr in ((base + ".npy", table), (base + "-done.npy", done)):  # table first: done never claims unwritten rows
            with open(path + ".tmp", "wb") as fh:
                np.save(fh, arr)
            os.replace(path + ".tmp", path)
    return table, int(todo.size)


def _meta(plan: WorldPlan, rows: np.ndarray, gallery: np.ndarray) -> dict[str, list[str]]:
    """field → (n,) JSON texts of the records ``rows`` ("" = absent)."""
    dumps = lambda v: "" if v is None else json.dumps(v)  # noqa: E731
    mixed = plan.mixed[rows]
    pl = {r: gallery[plan.partner_index[r]] for r in rows[mixed]}
    return {
        "split": [dumps(SPLITS[s]) for s in plan.split[rows]],
        "radius_km": [dumps(round(float(v), 4)) for v in plan.radius_km[rows]],
        "mixed": [dumps(bool(v)) for v in mixed],
        "mix_weight": [dumps(round(float(plan.alpha[r]), 4)) if plan.mixed[r] else "" for r in rows],
        "partner_lat": [dumps(round(float(pl[r][0]), 6)) if r in pl else "" for r in rows],
        "partner_lon": [dumps(round(float(pl[r][1]), 6)) if r in pl else "" for r in rows],
        "centre_lat": [dumps(round(float(v), 6)) for v in plan.centre[rows, 0]],
        "centre_lon": [dumps(round(float(v), 6)) for v in plan.centre[rows, 1]],
        "place_id": [dumps(int(v)) for v in plan.place_id[rows]],
        "gallery_index": [dumps(int(v)) for v in plan.gallery_index[rows]],
    }


def _write_store(path: str, split: str, identity: dict, created_by: dict, emb, latlon, keys, meta) -> None:
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    with StoreWriter.open(path, backbone=identity, embed_dim=emb.shape[1], created_by=created_by) as w:
        w.append_shard(f"geoclip-world:{split}", emb, latlon, keys, meta, [], ShardStat(size=int(emb.nbytes), mtime=None))


def _clear(out: str, stamp: str) -> None:
    """Remove the stores a previous world wrote (its stamp first, so a crash never leaves a stamp without stores)."""
    paths = [os.path.join(out, f"{s}.zarr") for s in SPLITS]
    if not os.path.exists(stamp):
        taken = [p for p in paths if os.path.exists(p)]
        if taken:
            raise GeopipeError(f"{taken[0]} exists but was not written by demo-data --world geoclip; choose a new folder")
        return
    os.remove(stamp)
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


def write_geoclip_world(out_dir: str, cfg: GeoclipWorldConfig, encoder, gallery: np.ndarray, progress: bool = True,
                        created_by: dict | None = None) -> GeoclipWorldResult:
    """Plan, embed and write the world into ``out_dir`` (see the module docstring); ``encoder``
    maps (n, 2) degrees to (n, D) (``.name``, ``.embed_dim``), ``gallery`` is (G, 2) degrees."""
    t0 = time.perf_counter()
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    label = world_label(cfg, encoder.name)
    settings = {"config": config_dict(cfg), "label": label,
                "gallery_sha256": hashlib.sha256(np.ascontiguousarray(gallery, dtype=np.float64).tobytes()).hexdigest()}
    stamp = os.path.join(out, _STAMP)
    stores = {s: os.path.join(out, f"{s}.zarr") for s in SPLITS}
    if os.path.exists(stamp):
        with open(stamp) as fh:
            old = json.load(fh)
        if {k: old.get(k) for k in settings} == settings:
            return GeoclipWorldResult(out, stores, old["counts"], label, 0, time.perf_counter() - t0, True)
    _clear(out, stamp)
    plan = plan_world(gallery, cfg)
    table, encoded = cached_unit_encodings(encoder, gallery, plan.needed(), os.path.join(out, "cache"), progress)
    emb = embed_world(plan, table, cfg)
    identity = {"name": label, "pretrained": encoder.name, "embed_dim": int(emb.shape[1]),
                "preprocess": {"source": "demo-data --world geoclip", "recipe": config_dict(cfg)},
                "fingerprint": hashlib.sha256(label.encode()).hexdigest()}
    made = {**(created_by or {}), "geoclip_world": settings}
    counts = {}
    for s, split in enumerate(SPLITS):
        rows = np.flatnonzero(plan.split == s)
        counts[split] = int(rows.size)
        if rows.size == 0:  # e.g. n_heldout=0 or n_val=0: no store
            stores.pop(split)
            continue
        meta = _meta(plan, rows, gallery)
        keys = [f"{split}_{i:07d}" for i in range(rows.size)]
        _write_store(stores[split], split, identity, made, emb[rows], gallery[plan.gallery_index[rows]], keys, meta)
    with open(stamp + ".tmp", "w") as fh:  # written last: a crash before it rebuilds next time
        json.dump({**settings, "counts": counts, "stores": stores}, fh, indent=1, sort_keys=True)
    os.replace(stamp + ".tmp", stamp)
    return GeoclipWorldResult(out, stores, counts, label, encoded, time.perf_counter() - t0, False)

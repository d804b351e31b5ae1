"""Predict stage: checkpoint + store → predictions Parquet (schemas.predictions).

Records are split into partitions of whole batches; each partition is scored independently
(in process, or as Dask tasks on a ``LocalCluster`` / remote scheduler) and the Arrow tables
are concatenated in row order. Noise is seeded per batch from (seed, first row), so the
output does not depend on how many workers ran it.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.device import resolve_device
from pipeline.errors import GeopipeError
from pipeline.predictor import PredictOptions, load_predictor, predict_batch
from pipeline.provenance import provenance
from pipeline.store import open_store
from schemas.predictions import GEO_METADATA, METADATA_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID

__all__ = ["PredictConfig", "PredictResult", "run_predict"]


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``geopipe predict``; sampling defaults follow spec A7."""

    checkpoint: str
    store: str
    out: str
    steps: int = 16
    guidance: float = 2.0
    sampler: str | None = None
    samples: int = 0
    ensemble: int = 0
    nll: bool = False
    localizability: int = 0
    rtol: float = 1e-5
    atol: float = 1e-5
    batch_size: int = 4096
    partition_batches: int = 8
    seed: int = 3407
    dask: str | None = None  # None: in process; "local:N": LocalCluster(N); else a scheduler address
    device: str = "auto"
    progress: bool = True

    def options(self) -> PredictOptions:
        return PredictOptions(self.steps, self.guidance, self.sampler, self.samples, self.ensemble,
                              self.nll, self.localizability, self.rtol, self.atol)


@dataclass(frozen=True)
class PredictResult:
    out: str
    n_records: int
    seconds: float
    records_per_s: float


@functools.lru_cache(maxsize=2)
def _cached_predictor(checkpoint: str, device: str, embed_dim: int):
    return load_predictor(checkpoint, resolve_device(device), expect_embed_dim=embed_dim)


def _wkb_points(lat: np.ndarray, lon: np.ndarray) -> list[bytes]:
    head = b"\x01\x01\x00\x00\x00"  # little-endian WKB Point
    xy = np.stack([lon, lat], axis=1).astype("<f8")
    return [head + row.tobytes() for row in xy]


def _predict_partition(cfg: PredictConfig, start: int, stop: int) -> pa.Table:
    """Score rows [start, stop) of the store; runs in the caller or in a Dask worker."""
    store = open_store(cfg.store)
    p = _cached_predictor(cfg.checkpoint, cfg.device, int(store.embeddings.shape[1]))
    columns: dict[str, list] = {name: [] for name in PREDICTIONS_SCHEMA.names}
    for b0 in range(start, stop, cfg.batch_size):
        b1 = min(stop, b0 + cfg.batch_size)
        g = torch.Generator(device=p.device).manual_seed(cfg.seed * 1_000_003 + b0)
        keys = np.asarray(store.keys[b0:b1]).astype(str).tolist()
        cols = predict_batch(p, np.asarray(store.embeddings[b0:b1]), np.asarray(store.latlon[b0:b1]), keys, cfg.options(), g)
        cols["key"] = keys
        cols["geometry"] = _wkb_points(cols["lat"], cols["lon"])
        for name in PREDICTIONS_SCHEMA.names:
            value = cols.get(name)
            columns[name].extend(list(value) if value is not None else [None] * (b1 - b0))
    arrays = [pa.array(columns[f.name], type=f.type) for f in PREDICTIONS_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=PREDICTIONS_SCHEMA)


def _partitions(n: int, rows: int):
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _run_dask(cfg: PredictConfig, parts) -> list[pa.Table]:
    from dask.distributed import Client, LocalCluster

    if cfg.dask.startswith("local"):
        n = int(cfg.dask.split(":", 1)[1]) if ":" in cfg.dask else 2
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(cfg.dask)
    try:
        futures = [client.submit(_predict_partition, cfg, s, e, pure=False) for s, e in parts]
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _metadata(cfg: PredictConfig, config: dict) -> dict[bytes, bytes]:
    model = {k: config.get(k) for k in ("method", "network", "backbone", "embed_dim", "step", "data_fingerprint", "git_rev", "version")}
    model["checkpoint"] = cfg.checkpoint
    model["space"] = config["method"].get("space")
    meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": asdict(cfg), "model": model, **provenance()}
    return {METADATA_KEY: json.dumps(meta, default=str).encode(), b"geo": json.dumps(GEO_METADATA).encode()}


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every record of ``cfg.store`` and write ``cfg.out``."""
    t0 = time.perf_counter()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise GeopipeError("--steps and --batch-size must be positive")
    store = open_store(cfg.store)
    p = _cached_predictor(cfg.checkpoint, cfg.device, int(store.embeddings.shape[1]))  # fail fast on mismatch
    n = len(store.keys)
    parts = _partitions(n, cfg.batch_size * cfg.partition_batches)
    if cfg.dask:
        tables = _run_dask(cfg, parts)
    else:
        from tqdm import tqdm

        tables = [_predict_partition(cfg, s, e) for s, e in tqdm(parts, desc="predict", unit="part", file=sys.stderr, disable=not cfg.progress)]
    table = pa.concat_tables(tables) if tables else PREDICTIONS_SCHEMA.empty_table()
    table = table.replace_schema_metadata(_metadata(cfg, p.config))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    tmp = f"{cfg.out}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, cfg.out)
    dt = time.perf_counter() - t0
    return PredictResult(cfg.out, n, dt, n / dt if dt > 0 else float("inf"))

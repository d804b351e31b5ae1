"""Predict stage: checkpoint + store → predictions Parquet (geopipe.schemas.predictions).

Records are split into partitions of whole batches; each partition is scored independently
(in process, or as Dask tasks on a ``LocalCluster`` / remote scheduler) and the Arrow tables
are concatenated in row order. Noise is seeded per batch from (seed, first row), so the
output does not depend on how many workers ran it.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import pyarrow as pa

from geopipe.pipeline.artifacts.predictions import predictions_metadata, write_predictions
from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.parallel import map_partitions
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.infer.predictor import PredictOptions, cached_predictor, predict_rows
from geopipe.pipeline.store.reader import open_store
from geopipe.schemas.predictions import PREDICTIONS_SCHEMA

__all__ = ["PredictConfig", "PredictResult", "run_predict"]


@dataclass(frozen=True)
class PredictConfig:
    """Options of ``geopipe predict``; sampling defaults as in docs/methods.md#samplers."""

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


def _predict_partition(cfg: PredictConfig, start: int, stop: int):
    """Score rows [start, stop) of the store; runs in the caller or in a Dask worker (which
    keeps the loaded model between partitions: ``cached_predictor``)."""
    store = open_store(cfg.store)
    p = cached_predictor(cfg.checkpoint, resolve_device(cfg.device), int(store.embeddings.shape[1]))
    return predict_rows(p, store, start, stop, cfg.options(), seed=cfg.seed, batch_size=cfg.batch_size)


def _partitions(n: int, rows: int):
    return [(s, min(n, s + rows)) for s in range(0, n, rows)]


def _model_identity(cfg: PredictConfig, config: dict) -> dict:
    model = {k: config.get(k) for k in ("method", "network", "backbone", "embed_dim", "step", "data_fingerprint", "git_rev", "version")}
    model["checkpoint"] = cfg.checkpoint
    model["space"] = config["method"].get("space")
    return model


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every record of ``cfg.store`` and write ``cfg.out``."""
    t0 = time.perf_counter()
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise GeopipeError("--steps and --batch-size must be positive")
    store = open_store(cfg.store)
    p = cached_predictor(cfg.checkpoint, resolve_device(cfg.device), int(store.embeddings.shape[1]))  # fail fast on mismatch
    n = len(store.keys)
    parts = [(cfg, s, e) for s, e in _partitions(n, cfg.batch_size * cfg.partition_batches)]
    from tqdm import tqdm

    with tqdm(total=n, desc="predict", unit="rec", file=sys.stderr, disable=not cfg.progress) as bar:
        tables = map_partitions(_predict_partition, parts, cfg.dask, on_done=lambda i, t: bar.update(t.num_rows))
    table = pa.concat_tables(tables) if tables else PREDICTIONS_SCHEMA.empty_table()
    write_predictions(table, cfg.out, predictions_metadata(asdict(cfg), _model_identity(cfg, p.config), provenance()))
    dt = time.perf_counter() - t0
    return PredictResult(cfg.out, n, dt, n / dt if dt > 0 else float("inf"))

"""Retrieve stage: query store(s) against a geotagged database store → a predictions table.

Exact top-K search (blocked matmul streaming the database chunk by chunk, or faiss when
installed), the top-1 position (``mode="top1"``) or the densest neighbour of a vMF kernel
mixture over the top-K (``mode="kernel"``, which also gives NLL, localizability and HDR
ranks on S²; the kernel is fitted on database records queried leave-one-out), the
training-free uncertainty scores, and whether each query has a positive in the database.
``geopipe evaluate`` scores the output like any model (plus Recall@K).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, write_predictions
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.lockfile import writer_note
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.eval.recall import POSITIVE_RADIUS_M, answerable, haversine_m, recall_summary
from geopipe.pipeline.retrieval.density import fit_kernel, kernel_localizability, kernel_mode, kernel_weights, neighbour_xyz
from geopipe.pipeline.retrieval.index import faiss_on_gpu, resolve_backend, search_topk
from geopipe.pipeline.retrieval.search import TopK
from geopipe.pipeline.retrieval.split import QueryDatabase, SplitConfig, split_rows
from geopipe.pipeline.sphere.geometry import haversine_km, latlon_to_xyz
from geopipe.pipeline.store.reader import EmbeddingStore, open_store
from geopipe.pipeline.uncertainty.scores import retrieval_scores

__all__ = ["MODES", "RetrieveConfig", "RetrieveResult", "run_retrieve", "check_compatible", "store_chunks"]

MODES = ("top1", "kernel")


@dataclass(frozen=True)
class RetrieveConfig:
    """query: store of the queries; database: store of the geotagged database, or None to split
    ``query`` by ``split`` (see :class:`geopipe.pipeline.retrieval.split.SplitConfig`); k
    neighbours; mode top1|kernel; backend auto|blocked|faiss; radius_m: positive radius of
    Recall@K; kernel_val: database records used to fit the kernel (mode kernel); device: where
    a faiss index lives (auto: the GPUs when faiss was built with GPU support and CUDA is there);
    uncertainty_checkpoint: a BayesCap checkpoint whose MC-dropout scores (mc_passes passes)
    become the log_u columns."""

    query: str
    out: str
    database: str | None = None
    k: int = 10
    mode: str = "top1"
    split: SplitConfig = field(default_factory=SplitConfig)
    backend: str = "auto"
    radius_m: float = POSITIVE_RADIUS_M
    kernel_val: int = 2000
    kernel_samples: int = 256
    uncertainty_checkpoint: str | None = None
    mc_passes: int = 15
    chunk_rows: int = 65536
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # a faiss index goes to the GPU(s) when faiss has GPU support and this resolves to CUDA

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown retrieval mode {self.mode!r}; choose one of {list(MODES)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"-k must be at least 1, got {self.k!r}")
        for name in ("mc_passes", "kernel_val", "kernel_samples", "chunk_rows"):
            check_int(getattr(self, name), "--mc-passes" if name == "mc_passes" else name, 1, where="retrieve")
        if not (isinstance(self.radius_m, (int, float)) and math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ConfigError(f"retrieve: --radius-m must be a finite number of metres > 0, got {self.radius_m!r}")
        if not isinstance(self.split, SplitConfig):
            raise ConfigError(f"retrieve: split must be a SplitConfig, got {type(self.split).__name__}")


@dataclass(frozen=True)
class RetrieveResult:
    out: str
    n_queries: int
    n_database: int
    backend: str
    recall: dict
    kernel: dict | None
    seconds: float


def _identity(store: EmbeddingStore) -> tuple:
    b = store.attrs.get("backbone") or {}
    return b.get("name"), b.get("pretrained"), b.get("fingerprint")


def check_compatible(query: EmbeddingStore, database: EmbeddingStore) -> None:
    """One GeopipeError for an empty query or database store, a dimension mismatch or different backbones."""
    if len(query) == 0:
        raise GeopipeError(f"query store {query.path} has no records" + (writer_note(query.path) or "; extract or import some first"))
    if len(database) == 0:
        raise GeopipeError(f"database store {database.path} has no records"
                           + (writer_note(database.path) or "; extract or import some first"))
    if query.embed_dim != database.embed_dim:
        raise GeopipeError(f"query store {query.path} has {query.embed_dim}-d embeddings but database store "
                           f"{database.path} has {database.embed_dim}-d; both must come from the same backbone")
    if _identity(query) != _identity(database):
        name = lambda s: f"{_identity(s)[0]!r}" + (f", fingerprint {str(_identity(s)[2])[:12]}" if _identity(query)[0] == _identity(database)[0] else "")  # noqa: E731
        raise GeopipeError(f"query store {query.path} (backbone {name(query)}) and database store {database.path} "
                           f"(backbone {name(database)}) were embedded by different backbones; re-extract one of them")


def store_chunks(store: EmbeddingStore, rows: np.ndarray, chunk_rows: int):
    """(row ids, embeddings) of the selected ``rows`` (sorted) in store order, one read per chunk."""
    n = len(store)
    step = max(chunk_rows // store.chunk_rows, 1) * store.chunk_rows
    keep = np.zeros(n, dtype=bool)
    keep[rows] = True
    for start in range(0, n, step):
        stop = min(n, start + step)
        sel = keep[start:stop]
        if sel.any():
            emb = store.embeddings[start:stop]
            yield np.arange(start, stop, dtype=np.int64)[sel], emb[sel]


def _select(store: EmbeddingStore, rows: np.ndarray) -> np.ndarray:
    return store.embeddings[rows] if rows.size else np.zeros((0, store.embed_dim), np.float32)


def _neighbour_latlon(db_latlon: np.ndarray, idx: np.ndarray) -> np.ndarray:
    ll = db_latlon[np.clip(idx, 0, None)]
    ll[idx < 0] = np.nan
    return ll


def _fit_kernel(db: EmbeddingStore, qd: QueryDatabase, db_latlon: np.ndarray, metric: str, cfg: RetrieveConfig):
    """Fit the kernel on up to ``kernel_val`` database records queried against the database
    (leave-one-out: never their own record or capture)."""
    rng = np.random.default_rng(cfg.seed)
    val = np.sort(rng.choice(qd.db_rows, size=min(cfg.kernel_val, qd.db_rows.size), replace=False))
    groups = qd.db_groups if qd.db_groups is not None else np.arange(len(db), dtype=np.int64)
    top = search_topk(_select(db, val).astype(np.float32), store_chunks(db, qd.db_rows, cfg.chunk_rows), cfg.k, metric,
                      cfg.backend, query_groups=groups[val], db_groups=groups, device=cfg.device)
    ok = (top.indices >= 0).any(axis=1)
    return fit_kernel(db_latlon[val][ok], _neighbour_latlon(db_latlon, top.indices[ok]), top.distances[ok], top.indices[ok])


def _plan(cfg: RetrieveConfig) -> tuple[EmbeddingStore, EmbeddingStore, QueryDatabase]:
    qs = open_store(cfg.query)
    if cfg.database is None:
        check_compatible(qs, qs)
        need = {"column": cfg.split.column, "capture": cfg.split.capture_field}.get(cfg.split.mode)
        if need is not None and len(qs) and need not in qs.meta:
            raise GeopipeError(f"{qs.path}: no metadata field {need!r} to split on (--split {cfg.split.mode}); fields are "
                               f"{sorted(qs.meta)} (or use --split blocks)")
        meta = {name: view[:] for name, view in qs.meta.items() if name in (cfg.split.column, cfg.split.capture_field)}
        qd = split_rows(qs.latlon[:], meta, cfg.split, source=qs.path)
        return qs, qs, qd
    db = open_store(cfg.database)
    check_compatible(qs, db)
    if db.path == qs.path:  # the same store on both sides: every record queries all the others
        meta = {name: view[:] for name, view in qs.meta.items() if name == cfg.split.capture_field}
        return qs, qs, split_rows(qs.latlon[:], meta, replace(cfg.split, mode="leave_one_out"), source=qs.path)
    return qs, db, QueryDatabase(np.arange(len(qs), dtype=np.int64), np.arange(len(db), dtype=np.int64), None, None)


def run_retrieve(cfg: RetrieveConfig) -> RetrieveResult:
    """Search, predict, score and write the predictions table (see the module docstring)."""
    t0 = time.perf_counter()
    from geopipe.pipeline.core.device import resolve_device

    resolve_device(cfg.device)  # a bad --device is one line before any work (it places a faiss index only)
    backend = resolve_backend(cfg.backend)
    qs, db, qd = _plan(cfg)
    if qd.query_rows.size == 0:
        raise GeopipeError(f"query store {qs.path} has no records")
    if cfg.uncertainty_checkpoint:  # a wrong checkpoint fails before the search, not after it
        from geopipe.stages.uncertainty import check_bayescap

        check_bayescap(cfg.uncertainty_checkpoint, qs)
    if cfg.k > qd.db_rows.size:  # no more neighbours than database records (a huge -k must not allocate)
        cfg = replace(cfg, k=int(qd.db_rows.size))
    metric = "ip" if qs.attrs.get("normalized") and db.attrs.get("normalized") else "l2"
    queries = _select(qs, qd.query_rows).astype(np.float32)
    top: TopK = search_topk(queries, store_chunks(db, qd.db_rows, cfg.chunk_rows), cfg.k, metric, backend,
                            query_groups=qd.query_groups, db_groups=qd.db_groups, device=cfg.device)
    if backend == "faiss" and faiss_on_gpu(cfg.device):
        backend = "faiss-gpu"
    db_latlon = db.latlon[:].astype(np.float64)
    nb = _neighbour_latlon(db_latlon, top.indices)
    true_ll = qs.latlon[qd.query_rows].astype(np.float64)
    cols: dict = {"key": [str(k) for k in qs.keys[qd.query_rows]], "true_lat": true_ll[:, 0], "true_lon": true_ll[:, 1]}
    if (top.indices[:, 0] < 0).any():
        raise GeopipeError(f"{int((top.indices[:, 0] < 0).sum())} queries have no eligible database record "
                           "(the database is empty after excluding their own captures)")
    pred = nb[:, 0].copy()
    kernel = None
    if cfg.mode == "kernel":
        fit = _fit_kernel(db, qd, db_latlon, metric, cfg)
        kernel = {**asdict(fit), "width_km": fit.width_km}
        mu = neighbour_xyz(nb)
        w = kernel_weights(top.distances, top.indices, fit.temperature)
        pred = kernel_mode(mu, w, fit.kappa)
        loc = kernel_localizability(mu, w, fit.kappa, latlon_to_xyz(torch.from_numpy(true_ll)), cfg.kernel_samples, cfg.seed)
        cols.update(loc)
    cols.update({"lat": pred[:, 0], "lon": pred[:, 1],
                 "distance_km": haversine_km(pred[:, 0], pred[:, 1], true_ll[:, 0], true_ll[:, 1])})
    keys_db = db.keys[np.unique(top.indices[top.indices >= 0])]
    key_of = dict(zip(np.unique(top.indices[top.indices >= 0]).tolist(), (str(k) for k in keys_db)))
    cols["topk_keys"] = [[key_of[i] for i in row if i >= 0] for row in top.indices.tolist()]
    cols["topk_distance"] = [row[ok].tolist() for row, ok in zip(top.distances, top.indices >= 0)]
    cols["topk_lat"] = [row[ok, 0].tolist() for row, ok in zip(nb, top.indices >= 0)]
    cols["topk_lon"] = [row[ok, 1].tolist() for row, ok in zip(nb, top.indices >= 0)]
    cols.update(retrieval_scores(top.distances, top.indices, nb, radius_m=cfg.radius_m))
    positive = answerable(true_ll, db_latlon[qd.db_rows], cfg.radius_m, qd.query_groups,
                          None if qd.db_groups is None else qd.db_groups[qd.db_rows])
    cols["answerable"] = positive
    if cfg.uncertainty_checkpoint:
        from geopipe.stages.uncertainty import score_rows

        cols.update(score_rows(cfg.uncertainty_checkpoint, qs, qd.query_rows, passes=cfg.mc_passes, seed=cfg.seed))
    ks = tuple(sorted({k for k in (1, 5, 10, 20) if k <= cfg.k} | {cfg.k}))
    recall = recall_summary(haversine_m(true_ll[:, 0:1], true_ll[:, 1:2], nb[..., 0], nb[..., 1]), positive, ks=ks, radius_m=cfg.radius_m)
    model = {"method": "retrieval", "space": "sphere", "mode": cfg.mode, "k": cfg.k, "metric": metric, "backend": backend,
             "database": db.path, "backbone": db.attrs.get("backbone"), "kernel": kernel,
             "recall": {"radius_m": cfg.radius_m, "n_unanswerable": recall["n_unanswerable"]}}
    config = {**asdict(cfg), "split": asdict(cfg.split)}
    table = predictions_table(cols, len(cols["key"]))
    write_predictions(table, cfg.out, predictions_metadata(config, model, provenance()))
    return RetrieveResult(out=cfg.out, n_queries=len(cols["key"]), n_database=int(qd.db_rows.size), backend=backend,
                          recall=recall, kernel=kernel, seconds=time.perf_counter() - t0)

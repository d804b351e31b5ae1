"""Retrieve stage: query store(s) against a geotagged database store → a predictions table.

Config in → library calls → result out, like the predict stage: the query/database split
(:mod:`geopipe.pipeline.retrieval.split`), the retrieval predictor loaded once
(:func:`geopipe.pipeline.retrieval.predictor.load_retrieval`: exact top-K search, blocked
matmul streaming the database or faiss when installed; with ``mode="kernel"`` a vMF kernel
mixture over the top-K fitted on database records queried leave-one-out, giving NLL,
localizability and HDR ranks on S²), then the queries block by block — search, columns,
training-free scores, Recall@K, BayesCap scores — each block's rows streamed to the output
Parquet (:class:`geopipe.pipeline.artifacts.outputs.PredictionsStream`; an existing output is
refused before any work unless ``overwrite``). Memory does not grow
with the number of queries, nor with ``k`` beyond one block. ``geopipe evaluate`` scores the
output like any model (plus Recall@K).

Positives (``positives``): ``utm`` decides them as the official VPR evaluation does, Euclidean
UTM distance <= ``radius_m`` (inclusive) from the stores' ``utm_east``/``utm_north`` metadata
(``extract --labels vpr-name``); ``sphere`` by haversine; ``auto`` (default) = ``utm`` when both
stores carry UTM positions of one zone, else ``sphere``. Recall@K is reported over every
labelled query (VPR papers' number) and over the answerable ones.

Unlabelled records (latlon NaN: no location) are kept as queries — geolocated, with null truth
columns and ``answerable``, left out of Recall@K and counted (``recall["n_unlabelled"]``) — and
skipped in the database, counted too: a record without a location cannot vote for one.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from geopipe.pipeline.artifacts.outputs import PredictionsStream, check_output
from geopipe.pipeline.artifacts.predictions import TRUTH_COLUMNS, predictions_metadata
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.parallel import trim_heap
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.eval.recall import POSITIVE_RADIUS_M
from geopipe.pipeline.retrieval.predictor import MODES, RecallTally, RetrievalOptions, load_retrieval, predict_block, search_block
from geopipe.pipeline.retrieval.search import TopK
from geopipe.pipeline.retrieval.split import QueryDatabase, SplitConfig, split_rows
from geopipe.pipeline.store.format import labelled_rows
from geopipe.pipeline.store.reader import EmbeddingStore, open_store
from geopipe.pipeline.store.space import check_query_database
from geopipe.pipeline.store.stream import read_rows
from geopipe.pipeline.vpr.positives import POSITIVE_RULES, resolve_positives

__all__ = ["MODES", "RetrieveConfig", "RetrieveResult", "run_retrieve"]


@dataclass(frozen=True)
class RetrieveConfig:
    """query: store of the queries; database: store of the geotagged database, or None to split
    ``query`` by ``split`` (see :class:`geopipe.pipeline.retrieval.split.SplitConfig`); k
    neighbours; mode top1|kernel; backend auto|blocked|faiss; radius_m: positive radius of
    Recall@K; kernel_val: database records used to fit the kernel (mode kernel); device: where
    a faiss index lives (auto: the GPUs when faiss was built with GPU support and CUDA is there);
    uncertainty_checkpoint: a BayesCap checkpoint whose MC-dropout scores (mc_passes passes)
    become the log_u columns; block_entries: (query, neighbour) pairs per block of queries, the
    knob of the memory a block takes (about 100 bytes a pair; one query at the least);
    calibrate / val_store (mode kernel): the calibrated density (pipeline/retrieval/calibrate.py)
    fitted on up to ``kernel_val`` records of ``val_store`` (held-out queries searched against
    the database; giving one turns calibrate on), or without one on database records queried
    leave-capture-out. overwrite: replace an existing ``out`` (else refused before any work)."""

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
    block_entries: int = 2**16
    seed: int = 0
    progress: bool = True
    device: str = "auto"  # a faiss index goes to the GPU(s) when faiss has GPU support and this resolves to CUDA
    calibrate: bool = False
    val_store: str | None = None
    positives: str = "auto"  # utm | sphere | auto (utm when both stores carry UTM positions of one zone)
    overwrite: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"unknown retrieval mode {self.mode!r}; choose one of {list(MODES)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ConfigError(f"-k must be at least 1, got {self.k!r}")
        for name in ("mc_passes", "kernel_val", "kernel_samples", "chunk_rows", "block_entries"):
            check_int(getattr(self, name), "--mc-passes" if name == "mc_passes" else name, 1, where="retrieve")
        if not (isinstance(self.radius_m, (int, float)) and math.isfinite(self.radius_m) and self.radius_m > 0):
            raise ConfigError(f"retrieve: --radius-m must be a finite number of metres > 0, got {self.radius_m!r}")
        if not isinstance(self.split, SplitConfig):
            raise ConfigError(f"retrieve: split must be a SplitConfig, got {type(self.split).__name__}")
        if self.positives not in POSITIVE_RULES:
            raise ConfigError(f"retrieve: unknown --positives {self.positives!r}; choose one of {list(POSITIVE_RULES)}")
        if (self.calibrate or self.val_store is not None) and self.mode != "kernel":
            raise ConfigError("retrieve: --calibrate and --val-store fit the kernel density; add --mode kernel")


@dataclass(frozen=True)
class RetrieveResult:
    out: str
    n_queries: int
    n_database: int
    backend: str
    recall: dict
    kernel: dict | None
    seconds: float
    n_database_unlabelled: int = 0  # database rows without a location, skipped


def _plan(cfg: RetrieveConfig) -> tuple[EmbeddingStore, EmbeddingStore, QueryDatabase]:
    qs = open_store(cfg.query)
    if cfg.database is None:
        check_query_database(qs, qs)
        need = {"column": cfg.split.column, "capture": cfg.split.capture_field}.get(cfg.split.mode)
        if need is not None and len(qs) and need not in qs.meta:
            raise GeopipeError(f"{qs.path}: no metadata field {need!r} to split on (--split {cfg.split.mode}); fields are "
                               f"{sorted(qs.meta)} (or use --split blocks)")
        meta = {name: view[:] for name, view in qs.meta.items() if name in (cfg.split.column, cfg.split.capture_field)}
        qd = split_rows(qs.latlon[:], meta, cfg.split, source=qs.path)
        return qs, qs, qd
    db = open_store(cfg.database)
    check_query_database(qs, db)
    if db.path == qs.path:  # the same store on both sides: every record queries all the others
        meta = {name: view[:] for name, view in qs.meta.items() if name == cfg.split.capture_field}
        return qs, qs, split_rows(qs.latlon[:], meta, replace(cfg.split, mode="leave_one_out"), source=qs.path)
    return qs, db, QueryDatabase(np.arange(len(qs), dtype=np.int64), np.arange(len(db), dtype=np.int64), None, None)


def _labelled_database(db: EmbeddingStore, qd: QueryDatabase) -> tuple[QueryDatabase, int]:
    """``qd`` without the database rows that have no location, and how many those were."""
    keep = labelled_rows(db.latlon[:])[qd.db_rows] if db.labelled < len(db) else np.ones(qd.db_rows.size, bool)
    if not keep.any():
        raise GeopipeError(f"database store {db.path} has no labelled records (none of its {qd.db_rows.size} database rows has "
                           f"a location to vote for); retrieve needs a geotagged database")
    return replace(qd, db_rows=qd.db_rows[keep]), int((~keep).sum())


def _without_truth(block, labelled: np.ndarray):
    """(the block with null truth columns and ``answerable`` on its unlabelled queries, the block
    of its labelled queries' hits for Recall@K)."""
    import pyarrow as pa

    cols = dict(block.columns)
    for name in (*TRUTH_COLUMNS, "answerable"):
        if name in cols:
            cols[name] = pa.array(np.asarray(cols[name]), mask=~labelled)
    return replace(block, columns=cols), replace(block, hits=block.hits[labelled], answerable=block.answerable[labelled])


def _options(cfg: RetrieveConfig) -> RetrievalOptions:
    return RetrievalOptions(k=cfg.k, mode=cfg.mode, backend=cfg.backend, radius_m=cfg.radius_m, kernel_val=cfg.kernel_val,
                            kernel_samples=cfg.kernel_samples, chunk_rows=cfg.chunk_rows, seed=cfg.seed, device=cfg.device,
                            block_entries=cfg.block_entries, calibrate=cfg.calibrate or cfg.val_store is not None)


def _scorer(cfg: RetrieveConfig, qs: EmbeddingStore, rows: np.ndarray):
    """The BayesCap scorer of the query rows (a wrong checkpoint fails here, before the search), or None."""
    if not cfg.uncertainty_checkpoint:
        return None
    from geopipe.pipeline.uncertainty.scoring import RowScorer, check_bayescap

    model, _ = check_bayescap(cfg.uncertainty_checkpoint, qs)
    return RowScorer(model, qs, rows, passes=cfg.mc_passes, seed=cfg.seed)


def _val_store(cfg: RetrieveConfig, db: EmbeddingStore) -> EmbeddingStore | None:
    """The validation store of the calibrated density (same embedding space as the database), or None."""
    if cfg.val_store is None:
        return None
    val = open_store(cfg.val_store)
    check_query_database(val, db)
    return val


def _searched(p, qs: EmbeddingStore, qd: QueryDatabase, n: int):
    """(start, stop, the block's TopK) of every block of queries: each search block read and
    searched at once (the database converted to float32 once for all its blocks), then cut."""
    for s0, s1 in p.search_blocks(n):
        groups = None if qd.query_groups is None else qd.query_groups[s0:s1]
        top = search_block(p, read_rows(qs, qd.query_rows[s0:s1]), groups)
        for a, b in p.blocks(s1 - s0):
            yield s0 + a, s0 + b, TopK(indices=top.indices[a:b], distances=top.distances[a:b])
        del top


def run_retrieve(cfg: RetrieveConfig) -> RetrieveResult:
    """Search, predict, score and write the predictions table (see the module docstring)."""
    t0 = time.perf_counter()
    check_output(cfg.out, cfg.overwrite)  # before any work
    from geopipe.pipeline.core.device import resolve_device

    resolve_device(cfg.device)  # a bad --device is one line before any work (it places a faiss index only)
    qs, db, qd = _plan(cfg)
    if qd.query_rows.size == 0:
        raise GeopipeError(f"query store {qs.path} has no records")
    qd, n_db_unlabelled = _labelled_database(db, qd)
    scorer = _scorer(cfg, qs, qd.query_rows)
    cfg = replace(cfg, k=min(cfg.k, int(qd.db_rows.size)))  # no more neighbours than database records
    metric = "ip" if qs.attrs.get("normalized") and db.attrs.get("normalized") else "l2"
    rule, db_utm, q_utm = resolve_positives(cfg.positives, qs, db)
    p = load_retrieval(db, _options(cfg), metric, qd.db_rows, qd.db_groups, val_store=_val_store(cfg, db), utm=db_utm)
    tally, n, n_unlabelled = RecallTally(p.ks, cfg.radius_m), int(qd.query_rows.size), 0
    with PredictionsStream(cfg.out, overwrite=cfg.overwrite) as out, Progress(total=n, desc="retrieve", unit="query", enabled=cfg.progress) as bar:
        for a, b, top in _searched(p, qs, qd, n):
            rows = qd.query_rows[a:b]
            groups = None if qd.query_groups is None else qd.query_groups[a:b]
            true_ll = qs.latlon[rows]
            block = predict_block(p, None, qs.keys[rows], true_ll, groups, first=a, query_utm=None if q_utm is None else q_utm[rows],
                                  top=top)
            if scorer is not None:
                block.columns.update(scorer.scores(a, b))
            labelled = labelled_rows(true_ll)
            block, scored = (block, block) if labelled.all() else _without_truth(block, labelled)
            n_unlabelled += int((~labelled).sum())
            tally.add(scored)
            out.write(block.columns, b - a)
            bar.update(b - a)
            del block, scored
            trim_heap()  # the block's freed arrays go back to the OS: resident memory stays flat over the blocks
        recall = {**tally.summary(), "n_unlabelled": n_unlabelled, "positives": rule}
        if n_unlabelled or n_db_unlabelled:  # never silently
            print(f"geopipe: retrieve: {n_unlabelled} unlabelled queries geolocated with null truth and left out of Recall@K; "
                  f"{n_db_unlabelled} unlabelled database rows skipped (no location to vote for)", file=sys.stderr)
        kernel = None if p.kernel is None else p.kernel.summary() if hasattr(p.kernel, "summary") else {**asdict(p.kernel), "width_km": p.kernel.width_km}
        model = {"method": "retrieval", "space": "sphere", "mode": cfg.mode, "k": cfg.k, "metric": metric, "backend": p.backend,
                 "database": db.path, "backbone": db.attrs.get("backbone"), "kernel": kernel,
                 "recall": {"radius_m": cfg.radius_m, "positives": rule, "n_unanswerable": recall["n_unanswerable"], "n_unlabelled": n_unlabelled},
                 "database_unlabelled": n_db_unlabelled}
        out.finish(predictions_metadata({**asdict(cfg), "split": asdict(cfg.split)}, model, provenance()))
    return RetrieveResult(out=cfg.out, n_queries=n, n_database=int(qd.db_rows.size), backend=p.backend,
                          recall=recall, kernel=kernel, seconds=time.perf_counter() - t0, n_database_unlabelled=n_db_unlabelled)

"""The retrieval predictor: a geotagged database loaded once, then queries predicted block by
block — the counterpart of :mod:`geopipe.pipeline.infer.predictor` for retrieval.

:func:`load_retrieval` reads the database side once: positions (N, 2) degrees, keys, the
embeddings of the searched rows (kept in memory, as stored, up to ``cache_bytes``; streamed
from the store for every block beyond that) or a faiss index, and — with ``mode="kernel"`` —
fits the vMF kernel on up to ``kernel_val`` database records queried against the database
(leave-one-out: never their own record or capture). :func:`predict_block` then turns a block
of query embeddings into predictions columns: exact top-K search, the top-1 position or the
kernel mode (with NLL, localizability and HDR rank), the top-K keys, distances and
positions, the training-free uncertainty scores and whether the query has a positive.

Positives are database records within ``radius_m`` of the query's true position: on the sphere
(haversine, the default), or — when the predictor is given the database's UTM positions
(``utm``, from stores extracted with ``--labels vpr-name``) and each block its queries' — in
the official VPR metric, Euclidean UTM distance in metres, inclusive
(:mod:`geopipe.pipeline.vpr.positives`).

Memory does not grow with the number of queries: the caller feeds blocks of
:meth:`RetrievalPredictor.block_size` queries, at most ``block_entries`` (query, neighbour)
pairs each (one query at the least), so a huge ``k`` shrinks the block instead of growing it;
it may search several blocks at once (:meth:`RetrievalPredictor.search_blocks`, up to 4,096
queries and ``4 * block_entries`` pairs) and hand each block its rows of the result (``top``),
so the database is converted to float32 once per search rather than once per block. Positives
of a query with a neighbour inside the radius need no scan of the database positions.
The kernel's Monte-Carlo samples are seeded per group of queries
(:func:`geopipe.pipeline.retrieval.density.sample_group`) and blocks are whole groups, so
the numbers do not depend on the block size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.recall import POSITIVE_RADIUS_M, answerable, correct_at_k, haversine_m
from geopipe.pipeline.retrieval.density import (
    KernelDensity,
    fit_kernel_blocks,
    kernel_localizability,
    kernel_mode,
    kernel_weights,
    neighbour_xyz,
    sample_group,
)
from geopipe.pipeline.retrieval.index import FaissIndex, faiss_on_gpu, resolve_backend
from geopipe.pipeline.retrieval.search import TopK, blocked_topk
from geopipe.pipeline.sphere.geometry import haversine_km, latlon_to_xyz
from geopipe.pipeline.store.stream import read_rows, store_chunks
from geopipe.pipeline.uncertainty.scores import retrieval_scores
from geopipe.pipeline.vpr.positives import utm_answerable, utm_hits

__all__ = ["MODES", "RetrievalOptions", "RetrievedBlock", "RetrievalPredictor", "load_retrieval", "search_block",
           "predict_block", "RecallTally"]

MODES = ("top1", "kernel")


@dataclass(frozen=True)
class RetrievalOptions:
    """k neighbours; mode top1|kernel; backend auto|blocked|faiss; radius_m: positive radius of
    Recall@K (m); kernel_val / kernel_samples: records the kernel is fitted on and Monte-Carlo
    samples per query; chunk_rows: database rows per read; device: where a faiss index lives;
    block_entries / max_block: (query, neighbour) pairs and queries per block at most;
    search_block: queries searched at once, a whole number of blocks (the held database chunks
    are converted to float32 once per search, so fewer, larger searches convert less; at most
    ``4 * block_entries`` pairs); cache_bytes: the searched embeddings are held in memory up to this size (else streamed
    from the store for every block)."""

    k: int = 10
    mode: str = "top1"
    backend: str = "auto"
    radius_m: float = POSITIVE_RADIUS_M
    kernel_val: int = 2000
    kernel_samples: int = 256
    chunk_rows: int = 65536
    seed: int = 0
    device: str = "auto"
    block_entries: int = 2**16
    max_block: int = 8192
    search_block: int = 4096
    cache_bytes: int = 2**31
    calibrate: bool = False  # mode kernel: the calibrated density fitted on held-out queries (pipeline/retrieval/calibrate.py)


@dataclass(frozen=True)
class RetrievedBlock:
    """columns: predictions columns of the block's B queries (numpy arrays; the top-K columns
    as pyarrow list arrays); hits: (B, len(ks)) bool, a positive among the first k neighbours
    for each k of :attr:`RetrievalPredictor.ks`; answerable: (B,) bool."""

    columns: dict
    hits: np.ndarray
    answerable: np.ndarray


class RetrievalPredictor:
    """The database side of a retrieval, loaded once (see the module docstring). ``rows``: the
    searched database rows (sorted); ``groups``: (N,) int64 group ids (a query never retrieves
    a row of its own group) or None; ``latlon`` (N, 2) float64 degrees; ``keys``: (N,) string
    array; ``metric`` ip|l2; ``backend`` blocked|faiss|faiss-gpu; ``kernel`` or None; ``ks``:
    the K of Recall@K; ``utm``: (N, 2) UTM east/north metres of the store's rows (NaN unknown)
    when positives are decided in UTM, else None."""

    def __init__(self, store, rows: np.ndarray, groups: np.ndarray | None, metric: str, opts: RetrievalOptions,
                 utm: np.ndarray | None = None):
        self.store, self.rows, self.groups, self.metric, self.opts = store, np.asarray(rows, dtype=np.int64), groups, metric, opts
        self.k = min(int(opts.k), int(self.rows.size))
        self.latlon = store.latlon[:].astype(np.float64)
        self.keys = pa.concat_arrays([pa.array([str(k) for k in store.keys[a:a + opts.chunk_rows]], type=pa.string())
                                      for a in range(0, len(store), opts.chunk_rows)] or [pa.array([], type=pa.string())])
        self.positive_latlon = self.latlon[self.rows]
        self.positive_groups = None if groups is None else np.asarray(groups)[self.rows]
        self.utm = None if utm is None else np.asarray(utm, dtype=np.float64).reshape(-1, 2)
        self.positive_utm = None if utm is None else self.utm[self.rows]
        self.ks = tuple(sorted({k for k in (1, 5, 10, 20) if k <= self.k} | {self.k}))
        self.backend = resolve_backend(opts.backend)
        self._faiss, self._cache = None, None
        if self.backend == "faiss":
            self._faiss = FaissIndex(store_chunks(store, self.rows, opts.chunk_rows), store.embed_dim, metric, groups, opts.device)
            self.backend = "faiss-gpu" if faiss_on_gpu(opts.device) else "faiss"
        elif self.rows.size * store.embed_dim * store.embeddings.dtype.itemsize <= opts.cache_bytes:
            self._cache = list(store_chunks(store, self.rows, opts.chunk_rows))
        self.kernel = None  # KernelDensity, or calibrate.CalibratedKernel with opts.calibrate

    def block_size(self) -> int:
        """Queries per block: at most ``block_entries // k`` and ``max_block``, a whole number of
        kernel sampling groups, at least one query."""
        b = max(1, min(self.opts.max_block, self.opts.block_entries // max(self.k, 1)))
        if self.opts.mode == "kernel":
            group = sample_group(self.k)
            b = max(group, b - b % group)
        return b

    def blocks(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) ranges of :meth:`block_size` covering [0, n)."""
        b = self.block_size()
        return [(a, min(n, a + b)) for a in range(0, n, b)]

    def search_blocks(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) ranges covering [0, n), each searched at once and then predicted in
        :meth:`blocks`: a whole number of :meth:`block_size`, up to ``search_block`` queries and
        ``4 * block_entries`` (query, neighbour) pairs (one block at the least)."""
        b = self.block_size()
        s = max(b, min(self.opts.search_block, 4 * self.opts.block_entries // max(self.k, 1)) // b * b)
        return [(a, min(n, a + s)) for a in range(0, n, s)]

    def chunks(self):
        """The searched database rows as (row ids, embeddings) chunks, from memory or the store."""
        return iter(self._cache) if self._cache is not None else store_chunks(self.store, self.rows, self.opts.chunk_rows)


def _search(p: RetrievalPredictor, queries: np.ndarray, query_groups, db_groups) -> TopK:
    if p._faiss is not None:
        return p._faiss.search(queries, p.k, query_groups, db_groups)
    return blocked_topk(queries, p.chunks(), p.k, p.metric, query_groups, db_groups)


def search_block(p: RetrievalPredictor, queries: np.ndarray, query_groups: np.ndarray | None = None) -> TopK:
    """Exact top-K database rows of the (B, D) ``queries`` (``query_groups`` (B,) with a grouped database)."""
    return _search(p, np.asarray(queries, dtype=np.float32), query_groups if p.groups is not None else None, p.groups)


def _neighbour_latlon(latlon: np.ndarray, idx: np.ndarray) -> np.ndarray:
    ll = latlon[np.clip(idx, 0, None)]
    ll[idx < 0] = np.nan
    return ll


def _fit_blocks(p: RetrievalPredictor):
    """(truth, neighbour positions, distances, indices) of the kernel's validation records, a block at a time."""
    rng = np.random.default_rng(p.opts.seed)
    val = np.sort(rng.choice(p.rows, size=min(p.opts.kernel_val, p.rows.size), replace=False))
    groups = p.groups if p.groups is not None else np.arange(len(p.store), dtype=np.int64)
    for a, b in p.blocks(val.size):
        rows = val[a:b]
        top = _search(p, read_rows(p.store, rows).astype(np.float32), groups[rows], groups)
        ok = (top.indices >= 0).any(axis=1)
        yield p.latlon[rows][ok], _neighbour_latlon(p.latlon, top.indices[ok]), top.distances[ok], top.indices[ok]


def _val_blocks(p: RetrievalPredictor, val_store):
    """(truth, neighbour positions, distances, indices) of up to ``kernel_val`` labelled records
    of a validation store searched against the database, a block at a time."""
    ll = val_store.latlon[:].astype(np.float64)
    labelled = np.flatnonzero(np.isfinite(ll).all(axis=1))
    rng = np.random.default_rng(p.opts.seed)
    val = np.sort(rng.choice(labelled, size=min(p.opts.kernel_val, labelled.size), replace=False))
    for a, b in p.blocks(val.size):
        top = _search(p, read_rows(val_store, val[a:b]).astype(np.float32), None, None)
        yield ll[val[a:b]], _neighbour_latlon(p.latlon, top.indices), top.distances, top.indices


def _fit_density(p: RetrievalPredictor, val_store):
    """The kernel: the old grid fit (database against itself), or with ``opts.calibrate`` the
    calibrated density fitted on the validation store's queries (or leave-capture-out without one)."""
    if not p.opts.calibrate:
        return fit_kernel_blocks(_fit_blocks(p))
    from geopipe.pipeline.retrieval.calibrate import fit_calibrated

    if val_store is None:
        return fit_calibrated(_fit_blocks(p), source="database records queried leave-capture-out")
    return fit_calibrated(_val_blocks(p, val_store), source=f"validation store {val_store.path}")


def load_retrieval(store, opts: RetrievalOptions, metric: str = "ip", rows: np.ndarray | None = None,
                   groups: np.ndarray | None = None, val_store=None, utm: np.ndarray | None = None) -> RetrievalPredictor:
    """The predictor of database ``store`` (an opened EmbeddingStore): its ``rows`` (default all)
    searched with ``metric``, ``groups`` (N,) excluded per query group; the kernel fitted when
    ``opts.mode == "kernel"`` (calibrated on ``val_store``'s records with ``opts.calibrate``);
    ``utm`` (N, 2) metres: positives decided in UTM (see the module docstring)."""
    if opts.mode not in MODES:
        raise GeopipeError(f"unknown retrieval mode {opts.mode!r}; choose one of {list(MODES)}")
    rows = np.arange(len(store), dtype=np.int64) if rows is None else rows
    p = RetrievalPredictor(store, rows, groups, metric, opts, utm)
    if opts.mode == "kernel":
        p.kernel = _fit_density(p, val_store)
    return p


def _lists(values: pa.Array | np.ndarray, valid: np.ndarray) -> pa.ListArray:
    """Rows of a (B, K) selection ``valid`` as a list array over the flat ``values`` (valid entries, row-major)."""
    offsets = np.zeros(valid.shape[0] + 1, dtype=np.int32)
    np.cumsum(valid.sum(axis=1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values if isinstance(values, pa.Array) else pa.array(values))


def _topk_columns(p: RetrievalPredictor, top: TopK, nb: np.ndarray) -> dict:
    valid = top.indices >= 0
    return {"topk_keys": _lists(p.keys.take(pa.array(top.indices[valid])), valid),
            "topk_distance": _lists(top.distances[valid], valid),
            "topk_lat": _lists(nb[..., 0][valid], valid), "topk_lon": _lists(nb[..., 1][valid], valid)}


def _kernel_columns(p: RetrievalPredictor, top: TopK, nb: np.ndarray, true_ll: np.ndarray, first: int) -> tuple[np.ndarray, dict]:
    fit = p.kernel
    if not isinstance(fit, KernelDensity):  # the calibrated density
        from geopipe.pipeline.retrieval.calibrate import calibrated_columns

        return calibrated_columns(fit, nb, top.distances, top.indices, true_ll, p.opts.kernel_samples, p.opts.seed, first,
                                  group=sample_group(p.k))
    mu = neighbour_xyz(nb)
    w = kernel_weights(top.distances, top.indices, fit.temperature)
    loc = kernel_localizability(mu, w, fit.kappa, latlon_to_xyz(torch.from_numpy(true_ll)), p.opts.kernel_samples,
                                p.opts.seed, first=first)
    return kernel_mode(mu, w, fit.kappa), loc


def _answerable(p: RetrievalPredictor, true_ll: np.ndarray, dist_m: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """(B,) bool: a positive of each query in the database. A query with a neighbour well inside
    the radius (``dist_m`` (B, K) metres to its top-K, 1 µm of margin for rounding) has one;
    only the others are looked up among all the database positions."""
    out = (np.nan_to_num(dist_m, nan=np.inf) <= p.opts.radius_m - 1e-6).any(axis=1)
    rest = np.flatnonzero(~out)
    if rest.size:
        out[rest] = answerable(true_ll[rest], p.positive_latlon, p.opts.radius_m, None if groups is None else np.asarray(groups)[rest],
                               p.positive_groups)
    return out


def predict_block(p: RetrievalPredictor, queries: np.ndarray | None, keys, true_latlon: np.ndarray,
                  query_groups: np.ndarray | None = None, first: int = 0, query_utm: np.ndarray | None = None,
                  top: TopK | None = None) -> RetrievedBlock:
    """Predictions of B queries: embeddings (B, D), keys (B,), true positions (B, 2) degrees (NaN
    when unknown), ``query_groups`` (B,) with a grouped database; ``first``: the position of the
    block's first query among all queries (a multiple of :meth:`RetrievalPredictor.block_size`);
    ``query_utm`` (B, 2) metres: the queries' UTM positions when the predictor has ``utm``;
    ``top``: the block's rows of a larger search (:meth:`RetrievalPredictor.search_blocks`),
    then ``queries`` is not searched (None will do)."""
    top = search_block(p, queries, query_groups) if top is None else top
    if (top.indices[:, 0] < 0).any():
        raise GeopipeError(f"{int((top.indices[:, 0] < 0).sum())} queries have no eligible database record "
                           "(the database is empty after excluding their own captures)")
    nb = _neighbour_latlon(p.latlon, top.indices)
    true_ll = np.asarray(true_latlon, dtype=np.float64)
    cols: dict = {"key": np.asarray([str(k) for k in keys], dtype=object), "true_lat": true_ll[:, 0], "true_lon": true_ll[:, 1]}
    pred = nb[:, 0].copy()
    if p.kernel is not None:
        pred, loc = _kernel_columns(p, top, nb, true_ll, first)
        cols.update(loc)
    cols.update({"lat": pred[:, 0], "lon": pred[:, 1],
                 "distance_km": haversine_km(pred[:, 0], pred[:, 1], true_ll[:, 0], true_ll[:, 1])})
    cols.update(_topk_columns(p, top, nb))
    cols.update(retrieval_scores(top.distances, top.indices, nb, radius_m=p.opts.radius_m))
    groups = query_groups if p.groups is not None else None
    if p.utm is not None:
        q_utm = np.full((len(true_ll), 2), np.nan) if query_utm is None else np.asarray(query_utm, dtype=np.float64)
        positive = utm_answerable(q_utm, p.positive_utm, p.opts.radius_m, groups, p.positive_groups)
        hit = utm_hits(q_utm, _neighbour_latlon(p.utm, top.indices), p.opts.radius_m)
    else:
        dist_m = haversine_m(true_ll[:, 0:1], true_ll[:, 1:2], nb[..., 0], nb[..., 1])
        positive = _answerable(p, true_ll, dist_m, groups)
        hit = correct_at_k(dist_m, p.opts.radius_m)
    cols["answerable"] = positive
    return RetrievedBlock(columns=cols, hits=hit[:, [k - 1 for k in p.ks]], answerable=positive)


class RecallTally:
    """Recall@K summed block by block: :meth:`summary` is what
    :func:`geopipe.pipeline.eval.recall.recall_summary` gives on all the blocks at once."""

    def __init__(self, ks: tuple[int, ...], radius_m: float):
        self.ks, self.radius_m = tuple(ks), float(radius_m)
        self.n = self.n_answerable = 0
        self.hits_all = np.zeros(len(self.ks), dtype=np.int64)
        self.hits_answerable = np.zeros(len(self.ks), dtype=np.int64)

    def add(self, block: RetrievedBlock) -> None:
        self.n += block.hits.shape[0]
        self.n_answerable += int(np.count_nonzero(block.answerable))
        self.hits_all += block.hits.sum(axis=0)
        self.hits_answerable += block.hits[block.answerable].sum(axis=0)

    def summary(self) -> dict:
        def recall(hits, n):
            return {k: (None if n == 0 else float(h / n)) for k, h in zip(self.ks, hits.tolist())}

        return {"radius_m": self.radius_m, "n": self.n, "n_unanswerable": self.n - self.n_answerable,
                "recall": recall(self.hits_answerable, self.n_answerable), "recall_all": recall(self.hits_all, self.n)}

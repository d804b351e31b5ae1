"""Search backends: the blocked matmul search (default, always available) and faiss exact
flat indexes when ``import faiss`` works (``pip install 'geopipe-geolocation[faiss]'``).

Both return the same neighbours: the faiss path over-fetches, then re-orders candidates by
(score, lower database row) and removes excluded groups exactly as the blocked path does.
faiss holds the whole database in memory (N·D·4 bytes); the blocked path streams it. With a
faiss built with GPU support (``faiss.get_num_gpus() > 0``) and a device that resolves to CUDA,
the flat index is moved to every visible GPU (``faiss.index_cpu_to_all_gpus``; still exact,
the same re-ordering applies); otherwise it stays on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.provenance import install_hint
from geopipe.pipeline.retrieval.search import METRICS, TopK, blocked_topk, scores_to_distances

__all__ = ["BACKENDS", "faiss_available", "faiss_gpus", "faiss_on_gpu", "resolve_backend", "FaissIndex", "faiss_topk", "search_topk"]

BACKENDS = ("auto", "blocked", "faiss")


def faiss_available() -> bool:
    """True when the optional faiss package imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_gpus() -> int:
    """GPUs the installed faiss can use: 0 without faiss or with a CPU-only build."""
    try:
        import faiss
    except ImportError:
        return 0
    return int(getattr(faiss, "get_num_gpus", lambda: 0)())


def faiss_on_gpu(device: str = "auto") -> bool:
    """True when the faiss index goes to the GPU(s): faiss has GPU support and ``device``
    resolves to CUDA (``auto``: when torch sees one)."""
    if device == "cpu" or faiss_gpus() == 0:
        return False
    from geopipe.pipeline.core.device import resolve_device

    return resolve_device(device).type == "cuda"


def _flat_index(dim: int, metric: str, device: str):
    """An empty exact flat index (inner product or L2), on every GPU when :func:`faiss_on_gpu`."""
    import faiss

    index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    return faiss.index_cpu_to_all_gpus(index) if faiss_on_gpu(device) else index


def resolve_backend(backend: str) -> str:
    """``auto`` → ``faiss`` when installed, else ``blocked``; ``faiss`` without faiss is an error."""
    if backend not in BACKENDS:
        raise GeopipeError(f"unknown search backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_available() else "blocked"
    if backend == "faiss" and not faiss_available():
        raise GeopipeError(f"search backend 'faiss' needs faiss: {install_hint('faiss')} (or use --backend blocked)")
    return backend


class FaissIndex:
    """An exact flat faiss index over a database given chunk by chunk (built once, searched
    block by block): ``ids`` (N,) int64 row ids in index order; ``extra``: the largest group
    size of ``db_groups`` (how many more neighbours a search fetches so that excluded rows
    never leave a query short)."""

    def __init__(self, chunks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int, metric: str = "ip",
                 db_groups: np.ndarray | None = None, device: str = "auto"):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
        self.metric, self.index = metric, _flat_index(dim, metric, device)
        row_ids = []
        for ids, emb in chunks:
            self.index.add(np.ascontiguousarray(emb, dtype=np.float32))
            row_ids.append(np.asarray(ids, dtype=np.int64))
        self.ids = np.concatenate(row_ids) if row_ids else np.zeros(0, dtype=np.int64)
        self.extra = 0
        if db_groups is not None and self.ids.size:
            self.extra = int(np.unique(np.asarray(db_groups)[self.ids], return_counts=True)[1].max())

    def search(self, queries: np.ndarray, k: int, query_groups: np.ndarray | None = None,
               db_groups: np.ndarray | None = None) -> TopK:
        """Exact top-``k`` of (Q, D) ``queries`` (same contract as
        :func:`geopipe.pipeline.retrieval.search.blocked_topk`)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        extra = self.extra if query_groups is not None and db_groups is not None else 0
        fetch = min(self.ids.size, k + extra + 8)  # a few more so ties at the k-th place are all seen
        nq = q.shape[0]
        best_s = np.full((nq, k), -np.inf, dtype=np.float32)
        best_i = np.full((nq, k), -1, dtype=np.int64)
        if fetch:
            raw, pos = self.index.search(q, fetch)
            score = raw if self.metric == "ip" else (q * q).sum(1, keepdims=True) - raw  # 2q·d − ‖d‖²
            rid = np.where(pos >= 0, self.ids[np.clip(pos, 0, None)], np.iinfo(np.int64).max)
            score = np.where(pos >= 0, score, -np.inf).astype(np.float32)
            if extra:
                own = np.asarray(db_groups)[np.clip(rid, 0, self.ids.max())] == np.asarray(query_groups)[:, None]
                score = np.where(own, -np.inf, score)
            order = np.lexsort((rid, -score), axis=-1)[:, :k]
            take = min(k, fetch)
            best_s[:, :take] = np.take_along_axis(score, order, axis=1)
            best_i[:, :take] = np.take_along_axis(rid, order, axis=1)
        best_i[~np.isfinite(best_s)] = -1
        qn = (q.astype(np.float64) ** 2).sum(1)
        return TopK(indices=best_i, distances=scores_to_distances(best_s, qn, self.metric))


def faiss_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
               query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None, device: str = "auto") -> TopK:
    """Exact top-``k`` with a faiss ``IndexFlatIP`` / ``IndexFlatL2``, on the GPU(s) when
    :func:`faiss_on_gpu` (same contract as :func:`geopipe.pipeline.retrieval.search.blocked_topk`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    groups = db_groups if query_groups is not None else None
    return FaissIndex(chunks, q.shape[1], metric, groups, device).search(q, k, query_groups, db_groups)


def search_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
                backend: str = "auto", query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None,
                device: str = "auto") -> TopK:
    """Exact top-``k`` with the chosen backend (see :data:`BACKENDS`); ``device`` places a faiss
    index (GPU when faiss has GPU support and it resolves to CUDA)."""
    if resolve_backend(backend) == "faiss":
        return faiss_topk(queries, chunks, k, metric, query_groups, db_groups, device)
    return blocked_topk(queries, chunks, k, metric, query_groups, db_groups)

"""Search backends: the blocked matmul search (default, always available) and faiss exact
flat indexes when ``import faiss`` works (``pip install 'geopipe[faiss]'``).

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
from geopipe.pipeline.retrieval.search import METRICS, TopK, blocked_topk, scores_to_distances

__all__ = ["BACKENDS", "faiss_available", "faiss_gpus", "faiss_on_gpu", "resolve_backend", "faiss_topk", "search_topk"]

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
        raise GeopipeError("search backend 'faiss' needs faiss: pip install 'geopipe[faiss]' (or use --backend blocked)")
    return backend


def faiss_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
               query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None, device: str = "auto") -> TopK:
    """Exact top-``k`` with a faiss ``IndexFlatIP`` / ``IndexFlatL2``, on the GPU(s) when
    :func:`faiss_on_gpu` (same contract as :func:`geopipe.pipeline.retrieval.search.blocked_topk`)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    q = np.ascontiguousarray(queries, dtype=np.float32)
    index = _flat_index(q.shape[1], metric, device)
    row_ids = []
    for ids, emb in chunks:
        index.add(np.ascontiguousarray(emb, dtype=np.float32))
        row_ids.append(np.asarray(ids, dtype=np.int64))
    ids_all = np.concatenate(row_ids) if row_ids else np.zeros(0, dtype=np.int64)
    extra = 0
    if query_groups is not None and db_groups is not None and ids_all.size:
        extra = int(np.unique(np.asarray(db_groups)[ids_all], return_counts=True)[1].max())
    fetch = min(ids_all.size, k + extra + 8)  # a few more so ties at the k-th place are all seen
    nq = q.shape[0]
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    if fetch:
        raw, pos = index.search(q, fetch)
        score = raw if metric == "ip" else (q * q).sum(1, keepdims=True) - raw  # 2q·d − ‖d‖²
        rid = np.where(pos >= 0, ids_all[np.clip(pos, 0, None)], np.iinfo(np.int64).max)
        score = np.where(pos >= 0, score, -np.inf).astype(np.float32)
        if extra:
            own = np.asarray(db_groups)[np.clip(rid, 0, ids_all.max())] == np.asarray(query_groups)[:, None]
            score = np.where(own, -np.inf, score)
        order = np.lexsort((rid, -score), axis=-1)[:, :k]
        take = min(k, fetch)
        best_s[:, :take] = np.take_along_axis(score, order, axis=1)
        best_i[:, :take] = np.take_along_axis(rid, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    qn = (q.astype(np.float64) ** 2).sum(1)
    return TopK(indices=best_i, distances=scores_to_distances(best_s, qn, metric))


def search_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
                backend: str = "auto", query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None,
                device: str = "auto") -> TopK:
    """Exact top-``k`` with the chosen backend (see :data:`BACKENDS`); ``device`` places a faiss
    index (GPU when faiss has GPU support and it resolves to CUDA)."""
    if resolve_backend(backend) == "faiss":
        return faiss_topk(queries, chunks, k, metric, query_groups, db_groups, device)
    return blocked_topk(queries, chunks, k, metric, query_groups, db_groups)

"""Exact top-K search streaming the database in chunks (blocked matmul, memory bounded).

This is the project's blocked matmul k-nearest-neighbour search for embeddings; the faiss
backend in :mod:`geopipe.pipeline.retrieval.index` must return the same neighbours.

Metrics: ``"ip"`` ranks by the inner product q·d (unit-norm stores; identical to ranking by
L2 for unit vectors) and reports ``2 − 2 q·d``; ``"l2"`` ranks by ``2 q·d − ‖d‖²`` and reports
the squared L2 distance ``‖q‖² + ‖d‖² − 2 q·d``. Ties are broken by the lower database row, so
results do not depend on the chunking. Peak memory ≈ queries (Q, D) + one database chunk
(C, D) + one score block (query_block, C) float32 + the running (Q, K) best.

Exclusion: with ``query_groups`` (Q,) and ``db_groups`` (N,) int64 a query never retrieves a
database row of its own group (its own record, or its own capture), marked by equal ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["METRICS", "TopK", "array_chunks", "blocked_topk", "scores_to_distances"]

METRICS = ("ip", "l2")
_SCORE_BLOCK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TopK:
    """indices: (Q, K) int64 database rows, best first, −1 where fewer than K rows were eligible;
    distances: (Q, K) float64 (``ip``: 2 − 2 q·d; ``l2``: squared L2), NaN where the index is −1."""

    indices: np.ndarray
    distances: np.ndarray


def array_chunks(database: np.ndarray, chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids (C,) int64, embeddings (C, D)) chunks of an in-memory (N, D) array."""
    n = database.shape[0]
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        yield np.arange(start, stop, dtype=np.int64), database[start:stop]


def scores_to_distances(scores: np.ndarray, query_sq_norm: np.ndarray, metric: str) -> np.ndarray:
    """Ranking scores (Q, K) → reported distances (float64, NaN for −inf)."""
    s = scores.astype(np.float64)
    d = 2.0 - 2.0 * s if metric == "ip" else np.maximum(query_sq_norm[:, None] - s, 0.0)
    return np.where(np.isfinite(s), d, np.nan)


def _order_rows(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per-row order by (score descending, id ascending)."""
    return np.lexsort((ids, -scores), axis=-1)


def _chunk_topk(s: torch.Tensor, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a (B, C) score block with exact lower-id tie breaking at the k-th place."""
    kk = min(k, s.shape[1])
    v, i = torch.topk(s, kk, dim=1)
    kth = v[:, -1:]
    ambiguous = ((s >= kth).sum(dim=1) > kk) & torch.isfinite(kth[:, 0])
    vals, idx = v.numpy(), ids[i.numpy()]
    for r in torch.nonzero(ambiguous).flatten().tolist():  # rare: a tie straddles the k-th place
        row = s[r].numpy()
        order = np.lexsort((ids, -row))[:kk]
        vals[r], idx[r] = row[order], ids[order]
    return vals, idx


def blocked_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
                 query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None,
                 query_block: int = 4096) -> TopK:
    """Exact top-``k`` database rows for each of the (Q, D) ``queries``.

    ``chunks`` yields (row ids (C,) int64 ascending across the stream, embeddings (C, D)); each
    chunk is read once. ``db_groups`` is indexed by row id. Torch float32 matmul on CPU.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {list(METRICS)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    nq, dim = q.shape
    best_s = np.full((nq, k), -np.inf, dtype=np.float32)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    qg = None if query_groups is None else torch.from_numpy(np.asarray(query_groups, dtype=np.int64))
    for ids, emb in chunks:
        if emb.shape[0] == 0:
            continue
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise ValueError(f"database chunk has shape {emb.shape}; queries have dimension {dim}")
        d = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
        dn = (d * d).sum(dim=1) if metric == "l2" else None
        dg = None if db_groups is None else torch.from_numpy(np.asarray(db_groups, dtype=np.int64)[ids])
        rows = max(1, min(query_block, _SCORE_BLOCK_BYTES // (4 * d.shape[0])))
        for a in range(0, nq, rows):
            b = min(nq, a + rows)
            s = q[a:b] @ d.T
            if dn is not None:
                s = 2.0 * s - dn
            if qg is not None and dg is not None:
                s.masked_fill_(qg[a:b, None] == dg[None, :], -np.inf)
            vals, idx = _chunk_topk(s, ids, k)
            cand_s = np.concatenate([best_s[a:b], vals], axis=1)
            cand_i = np.concatenate([best_i[a:b], idx], axis=1)
            order = _order_rows(cand_s, np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i))[:, :k]
            best_s[a:b] = np.take_along_axis(cand_s, order, axis=1)
            best_i[a:b] = np.take_along_axis(cand_i, order, axis=1)
    best_i[~np.isfinite(best_s)] = -1
    qn = (q.double() ** 2).sum(dim=1).numpy()
    return TopK(indices=best_i, distances=scores_to_distances(best_s, qn, metric))

"""Exact top-K search streaming the database in chunks (blocked matmul, memory bounded).

The search itself is the project's one blocked top-k, :func:`geopipe.pipeline.sphere.knn.knn`
(float32 here); this module adds retrieval's result type and reported distances. The faiss
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

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.sphere.knn import METRICS, array_chunks, knn

__all__ = ["METRICS", "TopK", "array_chunks", "blocked_topk", "scores_to_distances"]

#: Largest (query rows × chunk rows) float32 score block: 64 MiB is as fast as 256 MiB on a
#: 512-d store (the matmul stays large); the search writes every block into one reused buffer
#: (sphere/knn.py), so its transient memory is that block plus one converted database chunk.
_SCORE_BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TopK:
    """indices: (Q, K) int64 database rows, best first, −1 where fewer than K rows were eligible;
    distances: (Q, K) float64 (``ip``: 2 − 2 q·d; ``l2``: squared L2), NaN where the index is −1."""

    indices: np.ndarray
    distances: np.ndarray


def scores_to_distances(scores: np.ndarray, query_sq_norm: np.ndarray, metric: str) -> np.ndarray:
    """Ranking scores (Q, K) → reported distances (float64, NaN for −inf)."""
    s = scores.astype(np.float64)
    d = 2.0 - 2.0 * s if metric == "ip" else np.maximum(query_sq_norm[:, None] - s, 0.0)
    return np.where(np.isfinite(s), d, np.nan)


def blocked_topk(queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str = "ip",
                 query_groups: np.ndarray | None = None, db_groups: np.ndarray | None = None,
                 query_block: int = 4096) -> TopK:
    """Exact top-``k`` database rows for each of the (Q, D) ``queries``.

    ``chunks`` yields (row ids (C,) int64 ascending across the stream, embeddings (C, D)); each
    chunk is read once. ``db_groups`` is indexed by row id. Torch float32 matmul on CPU.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    scores, indices = knn(q, chunks, k, metric=metric, query_groups=query_groups, db_groups=db_groups, query_block=query_block,
                          block_bytes=_SCORE_BLOCK_BYTES)
    qn = (q.astype(np.float64) ** 2).sum(axis=1)
    return TopK(indices=indices, distances=scores_to_distances(scores, qn, metric))

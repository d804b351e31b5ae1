"""Recall@K of a retrieval at a distance threshold (visual place recognition convention).

A database item is a *positive* of a query when their great-circle distance is ``<= radius_m``
(inclusive, metres, R = 6371.0088 km). Recall@K is the fraction of queries whose top-K
retrieved items contain a positive. Queries with no positive in the whole database are
*unanswerable*: the benchmark convention counts them as misses, ours drops them by default
and reports how many were dropped plus the benchmark-style number (docs/methods.md).
Fractions in [0, 1]; format as percent only for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geopipe.pipeline.sphere.geometry import haversine_km

__all__ = ["POSITIVE_RADIUS_M", "RECALL_KS", "haversine_m", "correct_at_k", "recall_at_k", "recall_summary"]

#: Default positive radius in metres.
POSITIVE_RADIUS_M = 25.0
#: Default K values of Recall@K.
RECALL_KS: tuple[int, ...] = (1, 5, 10, 20)


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres between degree coordinates (numpy, broadcasting)."""
    return haversine_km(lat1, lon1, lat2, lon2) * 1000.0


def correct_at_k(dist_m, radius_m: float = POSITIVE_RADIUS_M) -> np.ndarray:
    """(Q, K) bool: ``hit[q, k]`` = some of the first k+1 neighbours lies within ``radius_m``.

    ``dist_m`` (Q, K) metres from each query's true position to its ranked neighbours
    (NaN = no neighbour, never a hit). Column 0 is the per-query ``correct@1``.
    """
    d = np.asarray(dist_m, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"correct_at_k: dist_m must be (Q, K), got shape {d.shape}")
    within = np.nan_to_num(d, nan=np.inf) <= radius_m
    return np.logical_or.accumulate(within, axis=1) if d.shape[1] else within


def recall_at_k(dist_m, answerable=None, ks: Sequence[int] = RECALL_KS, radius_m: float = POSITIVE_RADIUS_M,
                drop_unanswerable: bool = True) -> dict[int, float | None]:
    """Recall@K for each K in ``ks`` (fractions).

    ``dist_m`` (Q, K_max) metres to the ranked neighbours; ``answerable`` (Q,) bool = the query
    has a positive anywhere in the database (None: every query is answerable). With
    ``drop_unanswerable`` the denominator is the answerable queries, else all queries (their
    unanswerable ones count as misses). K larger than the columns uses all columns.
    None when the denominator is empty.
    """
    hit = correct_at_k(dist_m, radius_m)
    q = hit.shape[0]
    keep = np.ones(q, dtype=bool) if answerable is None else np.asarray(answerable, dtype=bool).reshape(-1)
    if keep.shape[0] != q:
        raise ValueError(f"recall_at_k: answerable has {keep.shape[0]} rows for {q} queries")
    rows = hit[keep] if drop_unanswerable else hit
    out: dict[int, float | None] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"recall_at_k: K must be >= 1, got {k}")
        if rows.shape[0] == 0 or hit.shape[1] == 0:
            out[int(k)] = None if rows.shape[0] == 0 else 0.0
            continue
        out[int(k)] = float(rows[:, min(k, hit.shape[1]) - 1].mean())
    return out


def recall_summary(dist_m, answerable=None, ks: Sequence[int] = RECALL_KS, radius_m: float = POSITIVE_RADIUS_M) -> dict:
    """Both conventions at once: ``{"radius_m", "n", "n_unanswerable", "recall" (answerable
    only), "recall_all" (unanswerable counted as misses)}``; recall dicts map K → fraction."""
    d = np.asarray(dist_m, dtype=np.float64)
    n = int(d.shape[0])
    n_un = 0 if answerable is None else int(n - np.count_nonzero(np.asarray(answerable, dtype=bool)))
    return {
        "radius_m": float(radius_m),
        "n": n,
        "n_unanswerable": n_un,
        "recall": recall_at_k(d, answerable, ks, radius_m, drop_unanswerable=True),
        "recall_all": recall_at_k(d, answerable, ks, radius_m, drop_unanswerable=False),
    }

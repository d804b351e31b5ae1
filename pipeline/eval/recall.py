"""Recall@K of a retrieval at a distance threshold (visual place recognition convention).

A database item is a *positive* of a query when their great-circle distance is ``<= radius_m``
(inclusive, metres, R = 6371.0088 km). Recall@K is the fraction of queries whose top-K
retrieved items contain a positive. Queries with no positive in the whole database are
*unanswerable*: the benchmark convention counts them as misses, ours drops them by default
and reports how many were dropped plus the benchmark-style number (docs/retrieval_uncertainty.md).
Fractions in [0, 1]; format as percent only for display.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from geopipe.pipeline.sphere.geometry import haversine_km

__all__ = ["POSITIVE_RADIUS_M", "RECALL_KS", "haversine_m", "answerable", "correct_at_k", "recall_at_k", "recall_summary",
           "format_vpr_recall"]

#: Default positive radius in metres.
POSITIVE_RADIUS_M = 25.0
#: Default K values of Recall@K.
RECALL_KS: tuple[int, ...] = (1, 5, 10, 20)


def haversine_m(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in metres between degree coordinates (numpy, broadcasting)."""
    return haversine_km(lat1, lon1, lat2, lon2) * 1000.0


def answerable(query_latlon, db_latlon, radius_m: float = POSITIVE_RADIUS_M, query_groups=None, db_groups=None) -> np.ndarray:
    """(Q,) bool: the database holds a positive (``<= radius_m``) of each query's position.

    ``query_latlon`` (Q, 2), ``db_latlon`` (N, 2) degrees (NaN rows never match); with
    ``query_groups`` (Q,) and ``db_groups`` (N,) a database row of the query's own group does
    not count (its own record or capture). Sorted by latitude, each query scans only the
    rows within ``radius_m`` of latitude: O((Q + N) log N + matches).
    """
    q = np.asarray(query_latlon, dtype=np.float64).reshape(-1, 2)
    db = np.asarray(db_latlon, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(db).all(axis=1)
    rows = np.flatnonzero(ok)
    order = rows[np.argsort(db[rows, 0], kind="stable")]
    lat_sorted = db[order, 0]
    dlat = np.rad2deg(radius_m / 6371008.8) * (1 + 1e-9)
    lo = np.searchsorted(lat_sorted, q[:, 0] - dlat, side="left")
    hi = np.searchsorted(lat_sorted, q[:, 0] + dlat, side="right")
    out = np.zeros(q.shape[0], dtype=bool)
    for i in np.flatnonzero((hi > lo) & np.isfinite(q).all(axis=1)):
        cand = order[lo[i]:hi[i]]
        if query_groups is not None and db_groups is not None:
            cand = cand[np.asarray(db_groups)[cand] != query_groups[i]]
        out[i] = bool(cand.size) and bool((haversine_m(q[i, 0], q[i, 1], db[cand, 0], db[cand, 1]) <= radius_m).any())
    return out


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


def _cells(recall: dict) -> str:
    return ", ".join(f"R@{k}: {100.0 * v:.1f}" for k, v in recall.items() if v is not None) or "-"


def format_vpr_recall(summary: dict, positives: str = "sphere") -> str:
    """Recall@K the way VPR papers print it (``R@1: 90.9, R@5: 95.7, …``, percent, one decimal)
    over every query (unanswerable ones are misses), then the answerable-only figure beside it.
    ``summary``: a :func:`recall_summary` dict; ``positives``: "utm" | "sphere" (shown)."""
    n, n_un = summary["n"], summary["n_unanswerable"]
    where = "UTM" if positives == "utm" else "haversine"
    return (f"{_cells(summary['recall_all'])}  ({where} {summary['radius_m']:g} m, all {n} queries)  |  answerable only "
            f"({n - n_un}; {n_un} without a positive): {_cells(summary['recall'])}")

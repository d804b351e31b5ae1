"""Positives in the evaluation's own metric: Euclidean distance between UTM positions, metres.

The official VPR evaluation (VPR-methods-evaluation, CosPlace/EigenPlaces ``test.py``) calls a
database image a positive of a query when their UTM (east, north) lie within 25 m, boundary
included (sklearn ``radius_neighbors``), and counts every query in the Recall@K denominator.
Stores extracted with ``--labels vpr-name`` carry ``utm_east``/``utm_north``/``utm_zone``/
``utm_letter`` metadata (:data:`UTM_FIELDS`); distances are only meaningful inside one zone and
hemisphere (one grid), so :func:`shared_grid` says whether two stores can be compared.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import ConfigError, GeopipeError

__all__ = ["POSITIVE_RULES", "UTM_FIELDS", "UtmPositions", "store_utm", "shared_grid", "positives_per_query", "utm_answerable", "utm_hits", "resolve_positives"]

#: How retrieval decides positives: UTM metres, haversine on the sphere, or utm when both stores allow it.
POSITIVE_RULES: tuple[str, ...] = ("auto", "utm", "sphere")
#: Metadata fields of a record's UTM position (metres, zone number, band letter).
UTM_FIELDS: tuple[str, ...] = ("utm_east", "utm_north", "utm_zone", "utm_letter")


@dataclass(frozen=True)
class UtmPositions:
    """east_north: (N, 2) float64 metres, NaN rows where a record has no UTM position; grids: the
    distinct grids ("<zone><N|S>", e.g. "17N") of the known rows, sorted."""

    east_north: np.ndarray
    grids: tuple[str, ...]


def _column(store, name: str) -> list | None:
    if name not in store.attrs.get("meta_fields", ()):
        return None
    out = []
    for raw in np.asarray(store.meta[name][:]).tolist():
        try:
            out.append(json.loads(raw) if isinstance(raw, str) and raw else None)
        except ValueError:
            out.append(None)
    return out


def _float(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan


def store_utm(store) -> UtmPositions | None:
    """The UTM positions of an opened embedding store's rows, or None when it has no
    ``utm_east``/``utm_north`` metadata."""
    east, north = _column(store, "utm_east"), _column(store, "utm_north")
    if east is None or north is None:
        return None
    zone, letter = _column(store, "utm_zone") or [None] * len(east), _column(store, "utm_letter") or [None] * len(east)
    en = np.array([[_float(e), _float(n)] for e, n in zip(east, north)], dtype=np.float64).reshape(-1, 2)
    grids = set()
    for i in np.flatnonzero(np.isfinite(en).all(axis=1)):
        z, band = zone[i], letter[i]
        grids.add(f"{z}{'N' if isinstance(band, str) and band.upper() >= 'N' else 'S'}" if z is not None and band else "?")
    return UtmPositions(en, tuple(sorted(grids)))


def shared_grid(a: UtmPositions | None, b: UtmPositions | None) -> str | None:
    """The one UTM grid both position sets lie in, or None (missing, mixed or unknown zones)."""
    if a is None or b is None or len(a.grids) != 1 or a.grids != b.grids or a.grids[0] == "?":
        return None
    return a.grids[0]


def positives_per_query(query_en, db_en, radius_m: float = 25.0, query_groups=None, db_groups=None) -> list[np.ndarray]:
    """For each of the (Q, 2) query positions, the ascending (P,) int64 rows of the (N, 2)
    database positions within ``radius_m`` metres (Euclidean, inclusive) — VPR-methods-evaluation's
    ``positives_per_query``. NaN positions match nothing; with ``query_groups`` (Q,) and
    ``db_groups`` (N,) a database row of the query's own group is no positive."""
    from scipy.spatial import cKDTree

    q = np.asarray(query_en, dtype=np.float64).reshape(-1, 2)
    db = np.asarray(db_en, dtype=np.float64).reshape(-1, 2)
    ok = np.flatnonzero(np.isfinite(db).all(axis=1))
    out = [np.zeros(0, dtype=np.int64)] * q.shape[0]
    if ok.size == 0:
        return out
    tree = cKDTree(db[ok])
    known = np.flatnonzero(np.isfinite(q).all(axis=1))
    # a hair wider than the radius, then the exact inclusive test: no boundary point is lost to rounding
    found = tree.query_ball_point(q[known], r=radius_m * (1 + 1e-9) + 1e-9)
    for i, cand in zip(known.tolist(), found):
        rows = ok[np.asarray(cand, dtype=np.int64)]
        rows = rows[np.hypot(*(db[rows] - q[i]).T) <= radius_m]
        if query_groups is not None and db_groups is not None:
            rows = rows[np.asarray(db_groups)[rows] != query_groups[i]]
        out[i] = np.sort(rows)
    return out


def utm_answerable(query_en, db_en, radius_m: float = 25.0, query_groups=None, db_groups=None) -> np.ndarray:
    """(Q,) bool: the database holds a positive of each query (see :func:`positives_per_query`)."""
    return np.array([p.size > 0 for p in positives_per_query(query_en, db_en, radius_m, query_groups, db_groups)], dtype=bool)


def utm_hits(query_en, neighbour_en, radius_m: float = 25.0) -> np.ndarray:
    """(Q, K) bool: some of the first k+1 ranked neighbours lies within ``radius_m`` metres of the
    query. ``query_en`` (Q, 2), ``neighbour_en`` (Q, K, 2) metres; NaN (no neighbour, no position)
    is never a hit. Column 0 is the per-query ``correct@1``."""
    q = np.asarray(query_en, dtype=np.float64).reshape(-1, 1, 2)
    nb = np.asarray(neighbour_en, dtype=np.float64)
    within = np.nan_to_num(np.hypot(nb[..., 0] - q[..., 0], nb[..., 1] - q[..., 1]), nan=np.inf) <= radius_m
    return np.logical_or.accumulate(within, axis=1) if within.shape[1] else within


def resolve_positives(rule: str, queries, database) -> tuple[str, np.ndarray | None, np.ndarray | None]:
    """("utm" | "sphere", database UTM (N, 2) or None, query UTM (Q, 2) or None) of two opened
    stores (possibly the same) under ``rule`` (:data:`POSITIVE_RULES`): ``auto`` is ``utm`` when
    both carry UTM positions of one grid; ``utm`` without them is a one-line GeopipeError."""
    if rule not in POSITIVE_RULES:
        raise ConfigError(f"unknown positives rule {rule!r}; choose one of {list(POSITIVE_RULES)}")
    if rule == "sphere":
        return "sphere", None, None
    q_utm = store_utm(queries)
    d_utm = q_utm if database.path == queries.path else store_utm(database)
    if shared_grid(q_utm, d_utm) is not None:
        return "utm", d_utm.east_north, q_utm.east_north
    if rule == "utm":
        which = [s.path for s, u in ((queries, q_utm), (database, d_utm)) if u is None]
        why = (f"{', '.join(dict.fromkeys(which))} has no UTM metadata (utm_east/utm_north: extract VPR images with "
               f"--labels vpr-name)" if which else f"the stores' UTM zones differ or are mixed ({q_utm.grids} vs {d_utm.grids})")
        raise GeopipeError(f"--positives utm: {why}; or use --positives sphere")
    return "sphere", None, None

"""Viewpoint pairs from (embedding, lat, lon[, heading, capture id]): records showing the same
scene from different viewpoints, the training data of BayesCap (docs/retrieval_uncertainty.md).

Candidate pairs (i, j), i < j: within ``pair_radius_m`` (haversine, inclusive); of different
captures (without capture ids: not closer than 0.5 m); with headings, ``|Δheading| <=
max_dheading_deg`` and some viewpoint change (``dist >= 1 m`` or ``|Δheading| >= 5°``); without
headings a visual filter: cosine similarity ≥ τ, the ``tau_quantile`` of the cosines of random
pairs farther apart than ``neg_min_dist_m`` (``negatives_calibrated``), or ``none``.
Records are split into train/validation by hashed spatial blocks; a pair whose ends fall in
different splits is dropped. Too few pairs (``min_pairs``, or under ``min_pairable_fraction``
of the records pairable) gives status ``insufficient_pairs``.

:func:`class_pair_set` pairs records by the CosPlace class convention instead (same UTM 10 m
cell and 30° heading bin, different captures: :mod:`geopipe.pipeline.vpr.classes`), with the
same split, statistics and status rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.eval.recall import haversine_m
from geopipe.pipeline.retrieval.split import _mix, spatial_blocks
from geopipe.pipeline.vpr.classes import class_pairs

__all__ = ["VISUAL_FILTERS", "PairConfig", "PairSet", "mine_pairs", "class_pair_set", "candidate_pairs"]

VISUAL_FILTERS = ("negatives_calibrated", "none")


@dataclass(frozen=True)
class PairConfig:
    """Pair-mining settings (defaults of docs/retrieval_uncertainty.md)."""

    pair_radius_m: float = 25.0
    max_dheading_deg: float = 45.0
    min_change_m: float = 1.0
    min_change_deg: float = 5.0
    visual_filter: str = "negatives_calibrated"
    tau_quantile: float = 0.95
    neg_min_dist_m: float = 100.0
    neg_samples: int = 100_000
    min_pairs: int = 2000
    min_pairable_fraction: float = 0.05
    val_fraction: float = 0.2
    block_m: float = 500.0
    seed: int = 0


@dataclass(frozen=True)
class PairSet:
    """train / val: (P, 2) int64 record rows (i < j); status "ok" | "insufficient_pairs";
    stats: counts, the chosen τ, histograms of distance (m), Δheading (°) and cosine."""

    train: np.ndarray
    val: np.ndarray
    status: str
    stats: dict


def candidate_pairs(latlon: np.ndarray, radius_m: float, eligible: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (P, 2) i < j of eligible records within ``radius_m`` and their distances (P,) m.
    Sorted by latitude, each record scans only the window of ±radius of latitude."""
    ll = np.asarray(latlon, dtype=np.float64)
    rows = np.flatnonzero(np.isfinite(ll).all(axis=1) if eligible is None else (eligible & np.isfinite(ll).all(axis=1)))
    order = rows[np.argsort(ll[rows, 0], kind="stable")]
    lat = ll[order, 0]
    hi = np.searchsorted(lat, lat + np.rad2deg(radius_m / 6371008.8) * (1 + 1e-9), side="right")
    out_i, out_j, out_d = [], [], []
    for a in range(order.size):
        if hi[a] <= a + 1:
            continue
        cand = order[a + 1:hi[a]]
        d = haversine_m(ll[order[a], 0], ll[order[a], 1], ll[cand, 0], ll[cand, 1])
        keep = d <= radius_m
        if keep.any():
            out_i.append(np.full(int(keep.sum()), order[a]))
            out_j.append(cand[keep])
            out_d.append(d[keep])
    if not out_i:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    i, j, d = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_d)
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).astype(np.int64)
    return pairs, d


def _cos(emb: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x, y = emb[a].astype(np.float64), emb[b].astype(np.float64)
    den = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return (x * y).sum(axis=1) / np.where(den > 0, den, 1.0)


def _tau(emb: np.ndarray, latlon: np.ndarray, eligible: np.ndarray, cfg: PairConfig) -> float | None:
    """The ``tau_quantile`` of cosines of random pairs farther apart than ``neg_min_dist_m``."""
    rows = np.flatnonzero(eligible)
    if rows.size < 2:
        return None
    rng = np.random.default_rng(cfg.seed)
    a, b = rows[rng.integers(0, rows.size, cfg.neg_samples)], rows[rng.integers(0, rows.size, cfg.neg_samples)]
    far = haversine_m(latlon[a, 0], latlon[a, 1], latlon[b, 0], latlon[b, 1]) > cfg.neg_min_dist_m
    if not far.any():
        return None
    return float(np.quantile(_cos(emb, a[far], b[far]), cfg.tau_quantile))


def _hist(values: np.ndarray, bins) -> dict:
    counts, edges = np.histogram(values, bins=bins)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def mine_pairs(embeddings: np.ndarray, latlon: np.ndarray, heading_deg: np.ndarray | None = None,
               capture: np.ndarray | None = None, exclude: np.ndarray | None = None,
               cfg: PairConfig = PairConfig()) -> PairSet:
    """Viewpoint pairs of the records (see the module docstring). ``heading_deg`` (N,) with NaN
    for unknown; ``capture`` (N,) int64 ids; ``exclude`` (N,) bool rows never paired (e.g. the
    evaluation queries)."""
    if cfg.visual_filter not in VISUAL_FILTERS:
        raise ValueError(f"unknown visual_filter {cfg.visual_filter!r}; choose one of {list(VISUAL_FILTERS)}")
    n = latlon.shape[0]
    eligible = np.ones(n, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    pairs, dist = candidate_pairs(latlon, cfg.pair_radius_m, eligible)
    i, j = pairs[:, 0], pairs[:, 1]
    keep = capture[i] != capture[j] if capture is not None else dist >= 0.5
    dh = np.full(len(pairs), np.nan)
    has_heading = heading_deg is not None and np.isfinite(heading_deg).any()
    tau = None
    if has_heading:
        h = np.asarray(heading_deg, dtype=np.float64)
        dh = np.abs((h[i] - h[j] + 180.0) % 360.0 - 180.0)
        known = np.isfinite(dh)
        keep &= ~known | ((dh <= cfg.max_dheading_deg) & ((dist >= cfg.min_change_m) | (dh >= cfg.min_change_deg)))
    cos = _cos(embeddings, i, j) if len(pairs) else np.zeros(0)
    if not has_heading and cfg.visual_filter == "negatives_calibrated":
        tau = _tau(embeddings, latlon, eligible, cfg)
        if tau is not None:
            keep &= cos >= tau
    return _pair_set(pairs[keep], dist[keep], dh[keep], cos[keep], latlon, int(eligible.sum()), tau, bool(has_heading), cfg)


def class_pair_set(classes: np.ndarray, embeddings: np.ndarray, latlon: np.ndarray, heading_deg: np.ndarray,
                   capture: np.ndarray | None = None, exclude: np.ndarray | None = None, cfg: PairConfig = PairConfig()) -> PairSet:
    """Pairs of records in one CosPlace class (``classes`` (N,) int64, −1 = none; see
    :func:`geopipe.pipeline.vpr.classes.cosplace_classes`) from different captures, never of
    ``exclude`` rows, split and judged as :func:`mine_pairs` does (its radius and heading rules
    are the classes' own: 10 m cells, 30° bins)."""
    eligible = np.ones(latlon.shape[0], dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    pairs = class_pairs(classes, capture, eligible, seed=cfg.seed)
    i, j = pairs[:, 0], pairs[:, 1]
    dist = haversine_m(latlon[i, 0], latlon[i, 1], latlon[j, 0], latlon[j, 1])
    h = np.asarray(heading_deg, dtype=np.float64)
    dh = np.abs((h[i] - h[j] + 180.0) % 360.0 - 180.0)
    cos = _cos(embeddings, i, j) if len(pairs) else np.zeros(0)
    return _pair_set(pairs, dist, dh, cos, latlon, int((eligible & (np.asarray(classes) >= 0)).sum()), None, True, cfg)


def _pair_set(pairs, dist, dh, cos, latlon, n_eligible: int, tau, has_heading: bool, cfg: PairConfig) -> PairSet:
    """Split the kept pairs into train/validation by hashed spatial blocks; status and statistics."""
    val_rec = _mix(spatial_blocks(latlon, cfg.block_m), cfg.seed + 1) < cfg.val_fraction
    same = val_rec[pairs[:, 0]] == val_rec[pairs[:, 1]]
    is_val = val_rec[pairs[:, 0]] & same
    pairable = np.unique(pairs.ravel()).size
    frac = pairable / max(n_eligible, 1)
    status = "ok" if len(pairs) >= cfg.min_pairs and frac >= cfg.min_pairable_fraction else "insufficient_pairs"
    stats = {"n_pairs": int(len(pairs)), "n_train": int((same & ~is_val).sum()), "n_val": int(is_val.sum()),
             "n_dropped_across_splits": int((~same).sum()), "n_records": n_eligible, "n_pairable": int(pairable),
             "pairable_fraction": float(frac), "tau": tau, "headings": bool(has_heading),
             "dist_m": _hist(dist, np.linspace(0, cfg.pair_radius_m, 11)),
             "dheading_deg": _hist(dh[np.isfinite(dh)], np.linspace(0, 180, 13)),
             "cos": _hist(cos, np.linspace(-1, 1, 21)), "min_pairs": cfg.min_pairs}
    return PairSet(train=pairs[same & ~is_val], val=pairs[is_val], status=status, stats=stats)

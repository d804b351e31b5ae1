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

**Widening to place pairs.** Photo collections without headings (MP-16-like stores, the geoclip
world) rarely hold two records within 25 m: 183 viewpoint pairs on 20,000 geoclip-world
records, 1.5 % pairable. There, after the street-scale radius, :func:`mine_pairs` tries the
place radii of :data:`PLACE_RADII_M` up to ``widen_to_m`` and keeps the first whose pairs
suffice: records of one place at a geolocation model's resolution, whose embedding change is
what BayesCap should learn. ``visual_filter="auto"`` filters by similarity at street scale
(≤ :data:`STREET_SCALE_M`: a viewpoint pair must share content) and not beyond: at place scale
the filter drops exactly the pairs whose embedding moved most (broad or ambiguous records), and
BayesCap's log_u then ranked failures worse (AUROC 0.62 with the filter, 0.67 without, 1 km
pairs; docs/retrieval_uncertainty.md). Stores with headings never widen. ``widen_to_m =
pair_radius_m`` turns widening off.

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

__all__ = ["VISUAL_FILTERS", "STREET_SCALE_M", "PLACE_RADII_M", "PairConfig", "PairSet", "mine_pairs", "class_pair_set", "candidate_pairs"]

VISUAL_FILTERS = ("auto", "negatives_calibrated", "none")
#: Radii (m) up to which a pair is a street-scale *viewpoint* pair (the "auto" visual filter applies).
STREET_SCALE_M = 100.0
#: Place-pair radii (m) tried in order after ``pair_radius_m`` on stores without headings.
PLACE_RADII_M = (1000.0, 2500.0, 10000.0, 25000.0)
_EARTH_M = 6371008.8


@dataclass(frozen=True)
class PairConfig:
    """Pair-mining settings (defaults of docs/retrieval_uncertainty.md). ``widen_to_m``: widest
    place radius tried when ``pair_radius_m`` finds too few pairs on a store without headings
    (see the module docstring); ``max_pairs``: a seeded random subset of at most this many pairs
    is kept (memory at km radii on large stores)."""

    pair_radius_m: float = 25.0
    widen_to_m: float = 25_000.0
    max_dheading_deg: float = 45.0
    min_change_m: float = 1.0
    min_change_deg: float = 5.0
    visual_filter: str = "auto"
    tau_quantile: float = 0.95
    neg_min_dist_m: float = 100.0
    neg_samples: int = 100_000
    min_pairs: int = 2000
    min_pairable_fraction: float = 0.05
    val_fraction: float = 0.2
    block_m: float = 500.0
    max_pairs: int = 2_000_000
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
    """All pairs (P, 2) i < j of eligible records within ``radius_m`` (haversine, inclusive) and
    their distances (P,) m, in (i, j) order. A KD-tree on unit-sphere ECEF points finds the
    candidates within the equivalent chord (O(N log N + P), also at km radii on 10⁵ records)."""
    from scipy.spatial import cKDTree

    ll = np.asarray(latlon, dtype=np.float64)
    finite = np.isfinite(ll).all(axis=1)
    rows = np.flatnonzero(finite if eligible is None else (np.asarray(eligible, dtype=bool) & finite))
    if rows.size < 2:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    lat, lon = np.deg2rad(ll[rows, 0]), np.deg2rad(ll[rows, 1])
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    chord = 2.0 * np.sin(min(radius_m / _EARTH_M, np.pi) / 2.0) * (1 + 1e-9) + 1e-12
    found = cKDTree(xyz).query_pairs(chord, output_type="ndarray")
    i, j = rows[found[:, 0]], rows[found[:, 1]]
    d = haversine_m(ll[i, 0], ll[i, 1], ll[j, 0], ll[j, 1])
    keep = d <= radius_m
    pairs = np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1)[keep].astype(np.int64)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    return pairs[order], d[keep][order]


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
    """Viewpoint pairs of the records, widened to place pairs where too few (see the module
    docstring). ``heading_deg`` (N,) with NaN for unknown; ``capture`` (N,) int64 ids;
    ``exclude`` (N,) bool rows never paired (e.g. the evaluation queries). ``stats["tried"]``
    lists (radius_m, n_pairs, pairable_fraction) of every radius tried; ``stats["radius_m"]`` is
    the one kept and ``stats["widened_from_m"]`` the configured one when it was widened."""
    if cfg.visual_filter not in VISUAL_FILTERS:
        raise ValueError(f"unknown visual_filter {cfg.visual_filter!r}; choose one of {list(VISUAL_FILTERS)}")
    eligible = np.ones(latlon.shape[0], dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    has_heading = heading_deg is not None and np.isfinite(heading_deg).any()
    radii = [float(cfg.pair_radius_m)]
    if not has_heading:
        radii += [r for r in PLACE_RADII_M if cfg.pair_radius_m < r <= cfg.widen_to_m]
    tried, tau = [], None
    for radius in radii:
        filt = cfg.visual_filter if cfg.visual_filter != "auto" else ("negatives_calibrated" if radius <= STREET_SCALE_M else "none")
        if filt == "negatives_calibrated" and not has_heading and tau is None:
            tau = _tau(embeddings, latlon, eligible, cfg)
        ps = _mine_at(radius, filt, tau if filt == "negatives_calibrated" and not has_heading else None, embeddings, latlon,
                      heading_deg if has_heading else None, capture, eligible, cfg)
        tried.append({"radius_m": radius, "n_pairs": ps.stats["n_pairs"], "pairable_fraction": ps.stats["pairable_fraction"]})
        if ps.status == "ok":
            break
    ps.stats.update(tried=tried, widened_from_m=float(cfg.pair_radius_m) if radius != cfg.pair_radius_m else None)
    return ps


def _mine_at(radius: float, filt: str, tau: float | None, embeddings, latlon, heading_deg, capture, eligible, cfg: PairConfig) -> PairSet:
    """The pairs within ``radius`` m under the capture, heading and visual (``filt``, ``tau``) rules."""
    pairs, dist = candidate_pairs(latlon, radius, eligible)
    i, j = pairs[:, 0], pairs[:, 1]
    keep = capture[i] != capture[j] if capture is not None else dist >= 0.5
    dh = np.full(len(pairs), np.nan)
    if heading_deg is not None:
        h = np.asarray(heading_deg, dtype=np.float64)
        dh = np.abs((h[i] - h[j] + 180.0) % 360.0 - 180.0)
        known = np.isfinite(dh)
        keep &= ~known | ((dh <= cfg.max_dheading_deg) & ((dist >= cfg.min_change_m) | (dh >= cfg.min_change_deg)))
    cos = _cos(embeddings, i, j) if len(pairs) else np.zeros(0)
    if tau is not None:
        keep &= cos >= tau
    found = int(keep.sum())
    if found > cfg.max_pairs:  # a seeded random subset: memory stays bounded at km radii
        rows = np.flatnonzero(keep)
        keep = np.zeros_like(keep)
        keep[np.sort(np.random.default_rng(cfg.seed).choice(rows, cfg.max_pairs, replace=False))] = True
    ps = _pair_set(pairs[keep], dist[keep], dh[keep], cos[keep], latlon, int(eligible.sum()), tau, heading_deg is not None, cfg,
                   radius)
    ps.stats.update(radius_m=float(radius), visual_filter=filt, n_found=found,
                    pair_kind="viewpoint" if radius <= STREET_SCALE_M else "place")
    return ps


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
    return _pair_set(pairs, dist, dh, cos, latlon, int((eligible & (np.asarray(classes) >= 0)).sum()), None, True, cfg, cfg.pair_radius_m)


def _pair_set(pairs, dist, dh, cos, latlon, n_eligible: int, tau, has_heading: bool, cfg: PairConfig, radius: float) -> PairSet:
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
             "dist_m": _hist(dist, np.linspace(0, radius, 11)),
             "dheading_deg": _hist(dh[np.isfinite(dh)], np.linspace(0, 180, 13)),
             "cos": _hist(cos, np.linspace(-1, 1, 21)), "min_pairs": cfg.min_pairs}
    return PairSet(train=pairs[same & ~is_val], val=pairs[is_val], status=status, stats=stats)

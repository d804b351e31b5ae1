"""Evaluation metrics on point predictions and predicted densities (numpy, float64).

Coordinates are **degrees** at every boundary, distances **km** (great circle, R = 6371.0088 km,
docs/methods.md#conventions), log-likelihoods **nats**. Companion modules: :mod:`geopipe.pipeline.eval.prdc` (precision /
recall / density / coverage on the sphere), :mod:`geopipe.pipeline.eval.calibration` (HDR coverage) and
:mod:`geopipe.pipeline.eval.admin` (country / region / city accuracies).
"""

from __future__ import annotations

import math

import numpy as np

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, haversine_km

__all__ = [
    "GEOSCORE_SCALE_KM",
    "ACCURACY_RADII_KM",
    "SPACES",
    "geoscore",
    "distance_metrics",
    "nll_summary",
    "localizability_summary",
    "constant_baseline",
]

#: GeoScore decay length in km: GeoScore(d) = 5000·exp(−d / 1492.7).
GEOSCORE_SCALE_KM = 1492.7
#: Radii r (km) of the distance accuracies; a record counts when d < r (strict; docs/methods.md#distance-metrics).
ACCURACY_RADII_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
#: Density spaces and the unit their log-likelihoods are in (not comparable across spaces: docs/methods.md#units).
SPACES: dict[str, str] = {
    "sphere": "nats per steradian on S²",
    "r3": "nats per unit volume in R³",
}


def geoscore(d_km) -> np.ndarray:
    """GeoScore of distances ``d_km`` (any shape, km): ``5000·exp(−d/1492.7)`` ∈ (0, 5000]."""
    return 5000.0 * np.exp(-np.asarray(d_km, dtype=np.float64) / GEOSCORE_SCALE_KM)


def _as_1d(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).reshape(-1)


def distance_metrics(pred_lat, pred_lon, true_lat, true_lon) -> dict:
    """Geolocation metrics of (N,) predicted vs true coordinates in degrees.

    Rows whose truth is missing (NaN) are excluded from every number and from ``n``; a
    non-finite *prediction* with a known truth is an error (predictions are never NaN: docs/methods.md#projection).
    Returns ``{"n", "mean_km", "median_km", "geoscore", "acc_1km", …, "acc_2500km"}`` where
    ``geoscore`` is the mean GeoScore and ``acc_<r>km`` the fraction with d < r (strict).
    With no usable row every value but ``n`` is ``None``.
    """
    plat, plon, tlat, tlon = (_as_1d(v) for v in (pred_lat, pred_lon, true_lat, true_lon))
    if not (plat.shape == plon.shape == tlat.shape == tlon.shape):
        raise ValueError(f"distance_metrics: coordinate arrays differ in length: {plat.shape}, {plon.shape}, {tlat.shape}, {tlon.shape}")
    known = np.isfinite(tlat) & np.isfinite(tlon)
    bad = known & ~(np.isfinite(plat) & np.isfinite(plon))
    if bad.any():
        raise ValueError(f"distance_metrics: non-finite prediction at row {int(np.flatnonzero(bad)[0])}; predictions must be finite")
    d = haversine_km(plat[known], plon[known], tlat[known], tlon[known])
    out: dict = {"n": int(d.size)}
    if d.size == 0:
        out.update({"mean_km": None, "median_km": None, "geoscore": None})
        out.update({f"acc_{r}km": None for r in ACCURACY_RADII_KM})
        return out
    out.update({"mean_km": float(d.mean()), "median_km": float(np.median(d)), "geoscore": float(geoscore(d).mean())})
    out.update({f"acc_{r}km": float(np.mean(d < r)) for r in ACCURACY_RADII_KM})
    return out


def nll_summary(log_likelihood, space: str) -> dict:
    """Summarise (N,) log-likelihoods of the true locations, nats per record (NaN rows skipped).

    ``nll_nats = −mean(log p)``; ``nll_bits_per_dim = −mean(log p)/(3 ln 2)`` — the paper's unit,
    bits per *ambient* dimension, D = 3 even on S² (docs/methods.md#units); uniform on S² gives
    ln(4π)/(3 ln 2) = 1.2172. ``space`` is ``"sphere"`` (per steradian) or ``"r3"`` (per unit
    volume); the two are not comparable, so the space and its unit travel with the numbers.
    """
    if space not in SPACES:
        raise ValueError(f"unknown density space {space!r}; choose one of {sorted(SPACES)}")
    lp = _as_1d(log_likelihood)
    lp = lp[~np.isnan(lp)]
    out: dict = {"n": int(lp.size), "space": space, "unit": SPACES[space]}
    if lp.size == 0:
        out.update({"mean_log_likelihood_nats": None, "nll_nats": None, "nll_bits_per_dim": None})
        return out
    mean = float(lp.mean())
    out.update({"mean_log_likelihood_nats": mean, "nll_nats": -mean, "nll_bits_per_dim": -mean / (3.0 * math.log(2.0))})
    return out


def localizability_summary(neg_entropy_nats, space: str = "sphere") -> dict:
    """Summarise (N,) localizabilities −H (nats; NaN rows skipped) of densities on ``space``
    (docs/methods.md#localizability).

    Per record the entropy is H = −(−H) nats = H/ln 2 bits and the effective area is
    exp(H)·R_E² km² (area of the uniform region with the same entropy; uniform on S² gives the
    Earth's area 4πR_E²). Returns means of −H and of the entropy in bits, medians of −H and of the
    effective area (the area is heavy-tailed, so its median is the readable summary). R³ densities
    (per unit volume) have no effective area: None.
    """
    neg = _as_1d(neg_entropy_nats)
    neg = neg[~np.isnan(neg)]
    out: dict = {"n": int(neg.size)}
    if neg.size == 0:
        out.update({k: None for k in ("mean_neg_entropy_nats", "median_neg_entropy_nats", "mean_entropy_bits", "median_effective_area_km2")})
        return out
    entropy = -neg
    out.update({
        "mean_neg_entropy_nats": float(neg.mean()),
        "median_neg_entropy_nats": float(np.median(neg)),
        "mean_entropy_bits": float(entropy.mean() / math.log(2.0)),
        "median_effective_area_km2": float(np.exp(np.median(entropy)) * EARTH_RADIUS_KM**2) if space == "sphere" else None,
    })
    return out


def constant_baseline(latlon_deg) -> tuple[float, float]:
    """Mean direction of (N, 2) training coordinates (lat, lon degrees) as (lat, lon) degrees.

    The normalised mean of the unit vectors, i.e. the point minimising the summed squared chordal
    distance — the constant prediction a model must beat. Raises ValueError when the input is
    empty, non-finite, or its mean vector is ~0 (no defined mean direction).
    """
    arr = np.asarray(latlon_deg, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"constant_baseline: expected (N, 2) lat/lon degrees with N > 0, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("constant_baseline: coordinates contain NaN or inf; drop those records first")
    lat, lon = np.deg2rad(arr[:, 0]), np.deg2rad(arr[:, 1])  # numpy: evaluate loads no torch
    mean = np.stack((np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)), axis=-1).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-9:
        raise ValueError("constant_baseline: the coordinates have no mean direction (their unit vectors sum to ~0)")
    unit = mean / norm
    return float(np.rad2deg(np.arcsin(np.clip(unit[2], -1.0, 1.0)))), float(np.rad2deg(np.arctan2(unit[1], unit[0])))

"""Training-free uncertainty scores, all oriented so that **higher = more uncertain**.

From a retrieval (descriptor distances d_k and neighbour positions of the top-K):

* ``u_dist1``: descriptor distance to the top-1;
* ``u_ratio12``: d1 / d2 (close to 1 = ambiguous between two places);
* ``u_spread_km``: spatial spread of the top-K, the square root of the weighted variance of
  their positions around the weighted mean (weights ``exp(−slope·d_k)`` normalised; local
  east/north km around the top-1, each axis capped at ``cap_km``);
* ``u_geo_inconsistency``: 1 − the fraction of the top-K within ``radius_m`` of the top-1.

(Generative models' entropy H = −(−H), from the predictions' ``neg_entropy_nats``, is ranked
beside them by :func:`geopipe.pipeline.eval.failure.failure_rows`.)
"""

from __future__ import annotations

import numpy as np

from geopipe.pipeline.eval.recall import haversine_m
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM
from geopipe.schemas.predictions import score_columns

__all__ = ["retrieval_scores"]


def _spread_km(nb_latlon: np.ndarray, w: np.ndarray, cap_km: float) -> np.ndarray:
    lat0 = np.deg2rad(nb_latlon[:, :1, 0])
    dlat = np.deg2rad(nb_latlon[..., 0] - nb_latlon[:, :1, 0]) * EARTH_RADIUS_KM
    dlon = np.deg2rad((nb_latlon[..., 1] - nb_latlon[:, :1, 1] + 180.0) % 360.0 - 180.0) * EARTH_RADIUS_KM * np.cos(lat0)
    var = np.zeros(nb_latlon.shape[0])
    for axis in (dlat, dlon):
        axis = np.nan_to_num(axis)
        mean = (w * axis).sum(axis=1, keepdims=True)
        dev = np.minimum(np.abs(axis - mean), cap_km)
        var += (w * dev ** 2).sum(axis=1)
    return np.sqrt(var)


def retrieval_scores(distances: np.ndarray, indices: np.ndarray, nb_latlon: np.ndarray, slope: float = 350.0,
                     cap_km: float = 0.5, radius_m: float = 25.0) -> dict[str, np.ndarray]:
    """The retrieval scores (Q,) float64 from (Q, K) descriptor distances and indices (−1 =
    none) and (Q, K, 2) neighbour positions in degrees, keyed and ordered as the predictions
    schema's ``retrieval`` score columns. Missing values are NaN."""
    d = np.asarray(distances, dtype=np.float64)
    valid = np.asarray(indices) >= 0
    ll = np.asarray(nb_latlon, dtype=np.float64)
    q, k = d.shape
    d1 = np.where(valid[:, 0], d[:, 0], np.nan) if k else np.full(q, np.nan)
    d2 = np.where(valid[:, 1], d[:, 1], np.nan) if k > 1 else np.full(q, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d2 > 0, d1 / d2, np.where(np.isfinite(d2), 1.0, np.nan))
    logits = np.where(valid, -slope * np.nan_to_num(d, nan=0.0), -np.inf)
    logits -= np.where(valid.any(axis=1, keepdims=True), logits.max(axis=1, keepdims=True), 0.0)
    w = np.exp(logits)
    w = w / np.where(w.sum(axis=1, keepdims=True) > 0, w.sum(axis=1, keepdims=True), 1.0)
    spread = np.where(valid[:, 0], _spread_km(ll, w, cap_km), np.nan) if k else np.full(q, np.nan)
    near = haversine_m(ll[:, :1, 0], ll[:, :1, 1], ll[..., 0], ll[..., 1]) <= radius_m
    frac = (near & valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    incons = np.where(valid[:, 0], 1.0 - frac, np.nan) if k else np.full(q, np.nan)
    scores = {"u_dist1": d1, "u_ratio12": ratio, "u_spread_km": spread, "u_geo_inconsistency": incons}
    return {name: scores[name] for name in score_columns("retrieval")}


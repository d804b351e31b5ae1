"""Prototypes of a spherical k-means clustering: per cluster a medoid record, its nearest
members, and how geographically coherent the cluster is.

Definitions (per cluster, from :class:`geopipe.pipeline.inspection.kmeans.KMeansResult`):

* medoid: the member with the largest cosine to the centroid (the member nearest the
  spherical mean direction); ``members``: the next ``n_members`` members by that cosine;
* geo-purity at radius r: the fraction of the members (the medoid included) within r of the
  medoid's location (great circle, inclusive), at ``purity_radius_m`` and at each of
  ``purity_km``;
* spatial spread: the median great-circle distance (km) of the members to the cluster's
  spherical mean location (the normalised mean of their unit position vectors; NaN when the
  members are spread so evenly that the mean vector vanishes);
* heading spread: the circular standard deviation sqrt(−2 ln R) in degrees of the members'
  headings, R the length of their mean unit heading vector (NaN without headings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.eval.metrics import ACCURACY_RADII_KM
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz

__all__ = ["PURITY_KM", "Prototypes", "top_members", "cluster_prototypes", "heading_spread_deg"]

#: Radii (km) of the extra geo-purity columns: the geolocation accuracy thresholds.
PURITY_KM: tuple[int, ...] = ACCURACY_RADII_KM


@dataclass(frozen=True)
class Prototypes:
    """K clusters. medoid: (K,) int64 rows; members: (K, M) int64 rows, best first, −1 past a
    cluster's size; member_cos: (K, M) float32 (NaN past the size); sizes: (K,) int64;
    purity: radius label ("25m", "1km", …) → (K,) float64 fraction; spread_km: (K,) float64;
    mean_latlon: (K, 2) degrees of the spherical mean location; heading_spread_deg: (K,)
    float64 or None when no headings were given; medoid_cos: (K,) float32."""

    medoid: np.ndarray
    medoid_cos: np.ndarray
    members: np.ndarray
    member_cos: np.ndarray
    sizes: np.ndarray
    purity: dict[str, np.ndarray]
    spread_km: np.ndarray
    mean_latlon: np.ndarray
    heading_spread_deg: np.ndarray | None


def top_members(labels: np.ndarray, cos: np.ndarray, k: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` rows of each of ``k`` clusters with the largest cosine (ties: lower row first):
    ((K, m) int64 rows with −1 padding, (K, m) float32 cosines with NaN padding)."""
    order = np.lexsort((np.arange(labels.size), -cos.astype(np.float64), labels))
    lab = labels[order]
    starts = np.searchsorted(lab, np.arange(k))
    rank = np.arange(order.size) - starts[lab]
    keep = rank < m
    rows = np.full((k, m), -1, dtype=np.int64)
    vals = np.full((k, m), np.nan, dtype=np.float32)
    rows[lab[keep], rank[keep]] = order[keep]
    vals[lab[keep], rank[keep]] = cos[order[keep]]
    return rows, vals


def _label(radius_km: float) -> str:
    return f"{radius_km * 1000:g}m" if radius_km < 1 else f"{radius_km:g}km"


def _xyz(latlon: np.ndarray) -> np.ndarray:
    """(N, 2) degrees → (N, 3) float64 unit vectors."""
    import torch

    return latlon_to_xyz(torch.from_numpy(np.ascontiguousarray(latlon, dtype=np.float64))).numpy()


def _spherical_means(labels: np.ndarray, xyz: np.ndarray, k: int) -> np.ndarray:
    """(K, 3) normalised mean unit position vectors (zero rows where the mean length R < 1e-9)."""
    sums = np.stack([np.bincount(labels, weights=xyz[:, j], minlength=k) for j in range(3)], axis=1)
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    ok = norm > 1e-9 * np.bincount(labels, minlength=k)[:, None]
    return np.where(ok, sums / np.where(ok, norm, 1.0), 0.0)


def _group_median(labels: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((values, labels))
    lab, val = labels[order], values[order]
    out = np.full(k, np.nan)
    starts = np.searchsorted(lab, np.arange(k))
    stops = np.searchsorted(lab, np.arange(k), side="right")
    for j in np.flatnonzero(stops > starts):
        out[j] = np.median(val[starts[j]:stops[j]])
    return out


def heading_spread_deg(labels: np.ndarray, heading_deg: np.ndarray, k: int) -> np.ndarray:
    """(K,) circular standard deviation in degrees of each cluster's headings (NaN headings
    are skipped; NaN for a cluster with none)."""
    ok = np.isfinite(heading_deg)
    h = np.deg2rad(heading_deg[ok])
    n = np.bincount(labels[ok], minlength=k).astype(np.float64)
    c = np.bincount(labels[ok], weights=np.cos(h), minlength=k)
    s = np.bincount(labels[ok], weights=np.sin(h), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip(np.hypot(c, s) / n, 1e-300, 1.0)
        return np.where(n > 0, np.rad2deg(np.sqrt(-2.0 * np.log(r))), np.nan)


def cluster_prototypes(labels: np.ndarray, cos: np.ndarray, latlon: np.ndarray, k: int, *, n_members: int = 8,
                       purity_radius_m: float = 25.0, purity_km=PURITY_KM, heading_deg: np.ndarray | None = None) -> Prototypes:
    """Prototypes of ``k`` clusters from (N,) labels, (N,) cosines to the centroids and (N, 2)
    degree locations (and optional (N,) headings in degrees, NaN = unknown); see the module docstring."""
    labels = np.asarray(labels, dtype=np.int64)
    latlon = np.asarray(latlon, dtype=np.float64)
    rows, vals = top_members(labels, np.asarray(cos), k, n_members + 1)
    sizes = np.bincount(labels, minlength=k).astype(np.int64)
    medoid = rows[:, 0]
    med_ll = latlon[np.clip(medoid, 0, None)][labels]
    dist_km = haversine_km(latlon[:, 0], latlon[:, 1], med_ll[:, 0], med_ll[:, 1])
    purity = {}
    for r_km in (purity_radius_m / 1000.0, *purity_km):
        within = np.bincount(labels, weights=(dist_km <= r_km).astype(np.float64), minlength=k)
        purity[_label(r_km)] = np.where(sizes > 0, within / np.maximum(sizes, 1), np.nan)
    xyz = _xyz(latlon)
    means = _spherical_means(labels, xyz, k)
    ok = np.linalg.norm(means, axis=1) > 0
    to_mean = np.arccos(np.clip(np.einsum("nd,nd->n", xyz, means[labels]), -1.0, 1.0)) * EARTH_RADIUS_KM
    spread = np.where(ok, _group_median(labels, to_mean, k), np.nan)
    mean_ll = np.where(ok[:, None], np.rad2deg(np.stack([np.arcsin(np.clip(means[:, 2], -1, 1)), np.arctan2(means[:, 1], means[:, 0])], axis=1)),
                       np.nan)
    heading = None if heading_deg is None else heading_spread_deg(labels, np.asarray(heading_deg, dtype=np.float64), k)
    return Prototypes(medoid=medoid, medoid_cos=vals[:, 0], members=rows[:, 1:], member_cos=vals[:, 1:], sizes=sizes, purity=purity,
                      spread_km=spread, mean_latlon=mean_ll, heading_spread_deg=heading)


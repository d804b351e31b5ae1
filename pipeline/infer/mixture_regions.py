"""Narrow kernels of a closed-form vMF mixture as discs of its highest-density region.

A record of the hybrid method can put most of its mass in kernels of 20 m – a few km at dozens of
neighbours hundreds of km apart; a lon/lat grid spanning them (:mod:`region_grid`) has cells far
wider than the kernels and misses their mass (on the geoclip world's test split a tenth of the
0.9-regions held less than half their mass). Here every *site* — a centre with kernels narrower
than ``NARROW_KM`` — becomes a disc: with b the density of everything else at the centre and the
site's kernels' profile f(r) = Σ_j w_j C(κ_j) exp(−κ_j (1 − cos r)), the region around the centre is
{r : f(r) + b ≥ τ}, a geodesic disc of radius r* with f(r*) = τ − b (none when f(0) + b < τ; the
grid's own contour covers it when b ≥ τ). b is taken constant over the disc, which holds when
the other components are much wider than r* (the narrow ones are at most ``NARROW_KM``).
"""

from __future__ import annotations

import math

import numpy as np

from geopipe.pipeline.infer.region_grid import unit_lonlat

__all__ = ["NARROW_KM", "narrow_sites", "site_discs"]

#: Kernels narrower than this (σ, km) are drawn as discs around their centres.
NARROW_KM = 10.0
_VERTICES = 48


def narrow_sites(mu: np.ndarray, kappa: np.ndarray, log_w: np.ndarray, narrow_km: float = NARROW_KM) -> list:
    """Sites of one record: [(centre (3,), kappa (n,), log_w (n,))] for the components (mu (C, 3),
    kappa (C,), log_w (C,) without the uniform's) narrower than ``narrow_km`` with finite weight,
    grouped by centre (the S kernels of a neighbour share it)."""
    from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM

    keep = (kappa >= (EARTH_RADIUS_KM / narrow_km) ** 2) & np.isfinite(log_w)
    if not keep.any():
        return []
    mu, kappa, log_w = mu[keep], kappa[keep], log_w[keep]
    key = np.round(mu / np.linalg.norm(mu, axis=1, keepdims=True), 12)
    _, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    return [(mu[inverse == s][0] / np.linalg.norm(mu[inverse == s][0]), kappa[inverse == s], log_w[inverse == s])
            for s in range(int(inverse.max()) + 1)]


def _log_profile(r: np.ndarray, kappa: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """ln Σ_j w_j C(κ_j) exp(−κ_j (1 − cos r)) at angles r (M,), nats per steradian."""
    log_c = np.log(kappa) - math.log(2.0 * math.pi) - np.log(-np.expm1(-2.0 * kappa))
    one_minus_cos = 2.0 * np.sin(np.asarray(r)[:, None] / 2.0) ** 2
    terms = log_w[None, :] + log_c[None, :] - kappa[None, :] * one_minus_cos
    top = terms.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(axis=1, keepdims=True)))[:, 0]


def _disc(centre: np.ndarray, radius: float):
    """A geodesic circle of angular ``radius`` around unit ``centre`` as a shapely Polygon in
    lon/lat degrees, longitudes unwrapped around the centre's (may pass 180: cut by the caller)."""
    from shapely.geometry import Polygon

    helper = np.array([0.0, 0.0, 1.0]) if abs(centre[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(centre, helper)
    u /= np.linalg.norm(u)
    v = np.cross(centre, u)
    t = np.linspace(0.0, 2.0 * math.pi, _VERTICES, endpoint=False)
    pts = centre[None, :] * math.cos(radius) + (np.cos(t)[:, None] * u + np.sin(t)[:, None] * v) * math.sin(radius)
    lon, lat = unit_lonlat(pts)
    lon0 = math.degrees(math.atan2(centre[1], centre[0]))
    lon = lon0 + (lon - lon0 + 180.0) % 360.0 - 180.0
    if lon0 < -180.0 + 90.0:  # keep the unwrapped longitudes ≥ −180: shift west-side discs by 360 (cut back by the caller)
        lon = lon + 360.0 * (lon.min() < -180.0)
    return Polygon(np.column_stack([lon, lat]))


def site_discs(sites: list, log_density, log_tau: float) -> list:
    """Disc polygons (lon/lat degrees, unwrapped) of the sites whose kernels reach τ above the rest
    of the density; ``log_density``: xyz (M, 3) → log p (M,) of the whole mixture, nats/sr."""
    if not sites or not math.isfinite(log_tau):
        return []
    centres = np.stack([c for c, _, _ in sites])
    log_total = np.asarray(log_density(centres), dtype=np.float64)
    out = []
    for (centre, kappa, log_w), lt in zip(sites, log_total):
        peak = float(_log_profile(np.zeros(1), kappa, log_w)[0])
        rest = math.exp(lt) - math.exp(peak) if lt > peak else 0.0  # the other components at the centre
        need = math.exp(log_tau) - rest
        if need <= 0.0 or peak < math.log(need):  # inside the grid's broad region, or never reaching τ
            continue
        lo, hi = 0.0, min(math.pi, 12.0 / math.sqrt(float(kappa.min())))
        for _ in range(60):  # the profile falls with r: bisection for f(r*) = τ − b
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _log_profile(np.array([mid]), kappa, log_w)[0] >= math.log(need) else (lo, mid)
        radius = 0.5 * (lo + hi)
        if radius > 0.0 and math.degrees(math.asin(min(1.0, abs(centre[2])))) + math.degrees(radius) < 89.0:  # a pole inside: the grid's
            out.append(_disc(centre, radius))
    return out

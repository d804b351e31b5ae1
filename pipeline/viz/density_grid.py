"""Density grids on the sphere for the maps: exact log-likelihoods or vMF-kernel KDEs on lat/lon cells.

Grids are cell-centred: for a resolution r, the world grid has ``lats`` (H,) from −90 + r/2 to
90 − r/2 and ``lons`` (W,) from −180 + r/2 to 180 − r/2 degrees; a regional grid covers an
``extent`` (lon0, lon1, lat0, lat1) degrees with cells of about r. ``logp`` (H, W) is a log
density in **nats per steradian** on S² (divide the density by R_E² = 6371.0088² km² for per-km²).

* :func:`density_grid_loglik` — the model's exact log-likelihood at every cell centre;
* :func:`density_grid_kde` — a von Mises–Fisher kernel density estimate of samples,
  p̂(x) = (1/N) Σ_i vMF(x; x_i, κ), with κ = 1/σ², σ = bandwidth_km / R_E (radians), the
  small-angle match of an isotropic Gaussian kernel of standard deviation ``bandwidth_km``.

A world grid integrates to ≈ 1 under :func:`grid_mass` (Σ p · cos φ · Δφ · Δλ, radians); a
regional grid gives the probability inside its extent. :func:`hdr_extent` picks a zoomed view.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from geopipe.pipeline.sphere.kde import kde_bandwidth_km, kde_log_density

__all__ = [
    "DensityGrid",
    "latlon_grid",
    "grid_mass",
    "hdr_extent",
    "density_grid_loglik",
    "density_grid_kde",
]


class DensityGrid(NamedTuple):
    """lats (H,) and lons (W,) cell centres in degrees; logp (H, W) nats per steradian (float64)."""

    lats: np.ndarray
    lons: np.ndarray
    logp: np.ndarray


def latlon_grid(resolution_deg: float, extent=None) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre latitudes (H,) and longitudes (W,) in degrees.

    World grid (``extent`` None): 180/r must be an integer. Regional grid: ``extent`` =
    (lon0, lon1, lat0, lat1) degrees inside the world, split into ⌈span/r⌉ equal cells per axis.
    """
    r = float(resolution_deg)
    h = 180.0 / r if r > 0 else 0.0
    if extent is not None:
        lon0, lon1, lat0, lat1 = (float(v) for v in extent)
        if not (r > 0 and -180 <= lon0 < lon1 <= 180 and -90 <= lat0 < lat1 <= 90):
            raise ConfigError(f"extent must be (lon0 < lon1, lat0 < lat1) inside the world in degrees and r > 0, got {extent!r}, r={r!r}")
        nw, nh = max(1, math.ceil((lon1 - lon0) / r - 1e-9)), max(1, math.ceil((lat1 - lat0) / r - 1e-9))
        return lat0 + (lat1 - lat0) / nh * (np.arange(nh) + 0.5), lon0 + (lon1 - lon0) / nw * (np.arange(nw) + 0.5)
    if not (0 < r <= 30) or abs(h - round(h)) > 1e-9:
        raise ConfigError(f"resolution_deg must divide 180 (e.g. 0.5, 1, 2, 3, 5), got {resolution_deg!r}")
    h = int(round(h))
    return -90.0 + r * (np.arange(h) + 0.5), -180.0 + r * (np.arange(2 * h) + 0.5)


def _cell_xyz(lats: np.ndarray, lons: np.ndarray) -> torch.Tensor:
    ll = np.stack(np.meshgrid(lats, lons, indexing="ij"), axis=-1).reshape(-1, 2)
    return latlon_to_xyz(torch.from_numpy(ll))  # (H*W, 3) float64


def grid_mass(grid: DensityGrid) -> float:
    """Total probability Σ p · cos φ · Δφ · Δλ of a cell-centred grid (≈ 1 for a density on S²)."""
    dphi = math.radians(abs(grid.lats[1] - grid.lats[0])) if len(grid.lats) > 1 else math.pi
    dlam = math.radians(abs(grid.lons[1] - grid.lons[0])) if len(grid.lons) > 1 else 2 * math.pi
    area = np.cos(np.radians(grid.lats))[:, None] * dphi * dlam
    return float(np.sum(np.exp(grid.logp) * area))


def hdr_extent(grid: DensityGrid, mass: float = 0.95, *, include=(), pad: float = 0.3, min_span_deg: float = 24.0):
    """A zoomed view (lon0, lon1, lat0, lat1) around the ``mass`` highest-density region, or None.

    The HDR is the smallest set of cells holding ``mass`` of the grid's probability; its bounding
    box, widened to hold the (lat, lon) points of ``include`` and padded by ``pad`` of its span,
    is grown to a 2:1 (lon:lat) box at least ``min_span_deg`` wide and kept inside the world.
    None (draw the world) when the region crosses the antimeridian or spans over 180° of longitude.
    """
    dphi, dlam = abs(grid.lats[1] - grid.lats[0]), abs(grid.lons[1] - grid.lons[0])
    prob = np.exp(grid.logp - np.nanmax(grid.logp)) * np.cos(np.radians(grid.lats))[:, None]
    prob = np.where(np.isfinite(prob), prob, 0.0)
    order = np.argsort(prob, axis=None)[::-1]
    k = int(np.searchsorted(np.cumsum(prob.flat[order]), mass * prob.sum())) + 1
    rows, cols = np.unravel_index(order[:k], prob.shape)
    lat = np.r_[grid.lats[rows] - dphi / 2, grid.lats[rows] + dphi / 2, [p[0] for p in include]]
    lon = np.r_[grid.lons[cols] - dlam / 2, grid.lons[cols] + dlam / 2, [p[1] for p in include]]
    (lon0, lon1), (lat0, lat1) = (lon.min(), lon.max()), (lat.min(), lat.max())
    if lon1 - lon0 > 180.0 or (lon0 <= -180 + dlam and lon1 >= 180 - dlam):
        return None
    w = max(min_span_deg, (lon1 - lon0) * (1 + 2 * pad), 2.0 * (lat1 - lat0) * (1 + 2 * pad))
    if w > 240.0:
        return None
    clon, clat, h = (lon0 + lon1) / 2, (lat0 + lat1) / 2, w / 2
    clon, clat = min(max(clon, -180 + w / 2), 180 - w / 2), min(max(clat, -90 + h / 2), 90 - h / 2)
    return (clon - w / 2, clon + w / 2, clat - h / 2, clat + h / 2)


def density_grid_loglik(method, model, cond, resolution_deg: float = 3.0, *, rtol: float = 1e-4, atol: float = 1e-4,
                        guidance: float = 0.0, chunk: int = 4096, extent=None,
                        on_points: Callable[[int], None] | None = None) -> DensityGrid:
    """Exact log p(x | c) of ``method``/``model`` at every cell centre of a lat/lon grid.

    cond: (D,) embedding of one record (numpy or tensor; moved to the model's device and dtype).
    ``extent``: a regional grid (see :func:`latlon_grid`). Points are scored in batches of ``chunk`` with ``method.log_likelihood`` (nats per steradian
    for sphere methods; R³ methods give per-unit-volume densities, see docs/methods.md).
    ``on_points(n)`` runs after each batch with the number of grid points just scored (progress).
    """
    lats, lons = latlon_grid(resolution_deg, extent)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    c = torch.as_tensor(np.asarray(cond), dtype=dtype, device=device).reshape(1, -1)
    x = _cell_xyz(lats, lons).to(device=device, dtype=dtype)
    out = []
    for s in range(0, len(x), max(1, int(chunk))):
        xb = x[s:s + chunk]
        lp = method.log_likelihood(model, xb, c.expand(len(xb), -1), rtol=rtol, atol=atol, guidance=guidance)
        out.append(lp.detach().double().cpu())
        if on_points is not None:
            on_points(len(xb))
    logp = torch.cat(out).numpy().reshape(len(lats), len(lons))
    return DensityGrid(lats, lons, logp)


def density_grid_kde(samples_xyz, resolution_deg: float = 3.0, *, bandwidth_km: float | None = None,
                     kappa: float | None = None, chunk_elements: int = 1 << 22, extent=None) -> DensityGrid:
    """vMF-kernel density estimate of ``samples_xyz`` (N, 3) unit vectors on a lat/lon grid.

    Give ``bandwidth_km`` (kernel σ in km along the surface), or ``kappa`` (concentration, 1/sr),
    or neither for :func:`kde_bandwidth_km`; ``extent``: a regional grid. Returns log densities in nats per steradian.
    """
    if bandwidth_km is not None and kappa is not None:
        raise ConfigError("give bandwidth_km or kappa for the KDE, not both")
    mu = torch.as_tensor(np.asarray(samples_xyz), dtype=torch.float64).reshape(-1, 3)
    if len(mu) == 0 or not torch.isfinite(mu).all():
        raise ValueError(f"density_grid_kde: need finite (N, 3) samples, got shape {tuple(mu.shape)}")
    mu = mu / mu.norm(dim=-1, keepdim=True)
    lats, lons = latlon_grid(resolution_deg, extent)
    if kappa is None:
        bw = kde_bandwidth_km(mu.numpy(), resolution_deg) if bandwidth_km is None else float(bandwidth_km)
        if not bw > 0:
            raise ConfigError(f"bandwidth_km must be > 0, got {bandwidth_km!r}")
        kappa = (EARTH_RADIUS_KM / bw) ** 2
    if not float(kappa) > 0:
        raise ConfigError(f"kappa must be > 0, got {kappa!r}")
    logp = kde_log_density(mu.numpy(), float(kappa), _cell_xyz(lats, lons).numpy(), chunk_elements=chunk_elements)
    return DensityGrid(lats, lons, logp.reshape(len(lats), len(lons)))

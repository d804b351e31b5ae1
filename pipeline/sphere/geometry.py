"""Sphere geometry on S² ⊂ R³: coordinate conversion, projections, exp/log maps, distances.

Conventions (docs/methods.md#conventions): latitude φ and longitude λ in **degrees** at every
public boundary;
``x = (cos φ cos λ, cos φ sin λ, sin φ)`` — x toward (0°N, 0°E), y toward (0°N, 90°E), z toward
the North pole. Torch functions keep the input dtype and broadcast over leading dimensions.
torch is imported inside them: the numpy helpers (``wrap_latlon``, ``haversine_km``,
``coordinate_problem``) serve commands that never load torch (import, store tools, evaluate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError

if TYPE_CHECKING:
    import torch

__all__ = [
    "EARTH_RADIUS_KM",
    "LOG_UNIFORM_SPHERE",
    "NonFiniteError",
    "NON_FINITE_ADVICE",
    "LAT_LIMIT",
    "LON_LIMIT",
    "coordinate_problem",
    "wrap_latlon",
    "latlon_to_xyz",
    "xyz_to_latlon",
    "project",
    "tangent_project",
    "sphere_dist",
    "sphere_log",
    "sphere_exp",
    "uniform_sphere",
    "fibonacci_sphere",
    "haversine_km",
]

#: Mean Earth radius in km (the one radius for every distance and area).
EARTH_RADIUS_KM = 6371.0088
#: log density of the uniform distribution on S², nats per steradian: −ln 4π.
LOG_UNIFORM_SPHERE = -math.log(4.0 * math.pi)


class NonFiniteError(GeopipeError, ValueError):
    """A model produced a non-finite coordinate; the one-line message names the offending record and
    what to do (a diverged checkpoint: retrain with a lower learning rate)."""

#: What a user does about a non-finite model output (appended to every NonFiniteError).
NON_FINITE_ADVICE = "; the model has probably diverged: retrain it with a lower --lr (or check that record's embedding)"


def _eps(dtype) -> float:
    import torch

    # geoopt's clamp, as in the reference implementation: 1e-4 in float32, 1e-7 in float64
    return 1e-7 if dtype == torch.float64 else 1e-4


#: Largest |latitude| and |longitude| accepted from inputs, degrees.
LAT_LIMIT, LON_LIMIT = 90.0, 180.0


def coordinate_problem(value, name: str, limit: float) -> tuple[str, str] | None:
    """Why ``value`` is not a usable input coordinate in degrees, or None when it is one.

    The one rule for every ingest (shard json, embedding-pair tables): a real number (not a
    bool), finite, with |value| ≤ ``limit`` (:data:`LAT_LIMIT` for latitudes, :data:`LON_LIMIT`
    for longitudes; the store wraps longitudes into [−180, 180)). Returns (reject reason, detail)
    with reasons from :data:`geopipe.schemas.rejects.REJECT_REASONS`: ``"missing_coordinates"``
    for None (a null), ``"invalid_coordinates"`` otherwise; ``name`` is the field's name.
    """
    if value is None:
        return "missing_coordinates", f"{name} is null"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "invalid_coordinates", f"{name} is not a number: {value!r:.60}"
    if not math.isfinite(value) or abs(value) > limit:
        return "invalid_coordinates", f"{name}={float(value)!r} outside [-{limit:g}, {limit:g}]"
    return None


def wrap_latlon(lat, lon):
    """Wrap degrees into lat ∈ [−90, 90], lon ∈ [−180, 180) (docs/methods.md#conventions).

    numpy arrays or floats."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.mod(lat + 90.0, 360.0) - 90.0
    over = lat > 90.0
    lat = np.where(over, 180.0 - lat, lat)
    lon = np.where(over, lon + 180.0, lon)
    lon = np.mod(lon + 180.0, 360.0) - 180.0
    return lat, lon


def latlon_to_xyz(latlon: torch.Tensor) -> torch.Tensor:
    """(…, 2) degrees (lat, lon) → (…, 3) unit vectors."""
    import torch

    rad = torch.deg2rad(latlon)
    lat, lon = rad[..., 0], rad[..., 1]
    return torch.stack((lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()), dim=-1)


def xyz_to_latlon(xyz: torch.Tensor, keys=None) -> torch.Tensor:
    """(…, 3) points → (…, 2) degrees (lat, lon), projecting onto the sphere first (docs/methods.md#projection).

    Raises :class:`NonFiniteError` naming the first offending record (``keys[i]`` when given)
    if any point is non-finite or zero, so no NaN prediction can ever leave the library.
    """
    import torch

    norm = xyz.norm(dim=-1, keepdim=True)
    bad = ~(torch.isfinite(xyz).all(dim=-1) & (norm[..., 0] > 0))
    if bad.any():
        idx = int(bad.reshape(-1).nonzero()[0])
        name = repr(keys[idx]) if keys is not None else f"#{idx}"
        raise NonFiniteError(f"non-finite or zero model output for record {name}: {xyz.reshape(-1, 3)[idx].tolist()}"
                             + NON_FINITE_ADVICE)
    unit = xyz / norm
    lat = torch.asin(unit[..., 2].clamp(-1.0, 1.0))
    lon = torch.atan2(unit[..., 1], unit[..., 0])
    return torch.rad2deg(torch.stack((lat, lon), dim=-1))


def project(x: torch.Tensor) -> torch.Tensor:
    """Radial projection onto S²: x / ‖x‖ over the last dimension."""
    return x / x.norm(dim=-1, keepdim=True)


def tangent_project(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Project ambient vectors u onto the tangent plane at unit x: u − ⟨x, u⟩ x."""
    return u - (x * u).sum(dim=-1, keepdim=True) * x


def sphere_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Great-circle angle (radians) between unit vectors, with geoopt's clamp of ⟨x, y⟩."""
    import torch

    e = _eps(x.dtype)
    return torch.arccos((x * y).sum(dim=-1).clamp(-1 + e, 1 - e))


def sphere_log(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logarithmic map log_x(y): tangent vector at x of length dist(x, y) pointing to y."""
    import torch

    u = tangent_project(x, y - x)
    dist = sphere_dist(x, y).unsqueeze(-1)
    norm = u.norm(dim=-1, keepdim=True)
    scaled = u * dist / norm.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(dist > _eps(x.dtype), scaled, u)


def sphere_exp(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exponential map exp_x(u) = cos‖u‖ x + sin‖u‖ u/‖u‖ (retraction proj(x+u) for tiny ‖u‖)."""
    import torch

    norm = u.norm(dim=-1, keepdim=True)
    exact = norm.cos() * x + norm.sin() * u / norm.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(norm > _eps(x.dtype), exact, project(x + u))


def uniform_sphere(n: int, *, generator: torch.Generator | None = None, dtype=None, device=None) -> torch.Tensor:
    """(n, 3) points uniform on S² (normalised standard-normal draws); dtype None: float32."""
    import torch

    g = torch.randn(n, 3, generator=generator, dtype=dtype or torch.float32, device=device)
    return project(g)


def fibonacci_sphere(n: int, *, dtype=None, device=None) -> torch.Tensor:
    """(n, 3) near-equal-area points of the Fibonacci lattice: each stands for 4π/n sr, so
    ``4π/n · Σ exp(log p)`` integrates a density over the sphere (quadrature checks, grids);
    dtype None: float64."""
    import torch

    i = torch.arange(n, dtype=dtype or torch.float64, device=device) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    r = torch.sqrt((1 - z * z).clamp_min(0))
    return torch.stack((r * phi.cos(), r * phi.sin(), z), dim=-1)


def haversine_km(lat1, lon1, lat2, lon2):
    """Great-circle distance in km between degree coordinates (numpy, broadcasting), R = 6371.0088."""
    p1, l1, p2, l2 = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    h = np.clip(h, 0.0, 1.0)
    return EARTH_RADIUS_KM * 2.0 * np.arctan2(np.sqrt(h), np.sqrt(1.0 - h))

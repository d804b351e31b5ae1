"""Kernel density estimates on S²: a von Mises–Fisher kernel around each sample.

p̂(x) = (1/N) Σ_i vMF(x; x_i, κ), κ = 1/σ², σ = bandwidth_km / R_E (radians): the small-angle
match of an isotropic Gaussian kernel of standard deviation ``bandwidth_km``. Log densities are
nats per steradian. Used by the maps' KDE mode and by the highest-density regions of flow models.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM
from geopipe.pipeline.sphere.knn import knn

__all__ = ["kde_bandwidth_km", "kde_kappa", "kde_log_density"]


def kde_kappa(bandwidth_km: float) -> float:
    """vMF concentration (1/sr) of a kernel of ``bandwidth_km`` standard deviation on the ground."""
    sigma = float(bandwidth_km) / EARTH_RADIUS_KM
    return 1.0 / (sigma * sigma)


def kde_bandwidth_km(samples_xyz, resolution_deg: float, *, max_points: int = 4096) -> float:
    """Default kernel width (km): the median distance from a sample to its k-th nearest neighbour.

    k = ⌈N^(2/3) / 2⌉ matches Scott's rule σ·N^(−1/6) inside one Gaussian cluster of N points
    (there d_k ≈ σ·√(2k/N)) but, unlike a rule on the global spread, stays local for multi-modal
    samples. Floored at one grid cell (r·π/180·R_E) so the grid resolves every kernel and the grid
    integrates to 1. At most ``max_points`` samples (the first ones) are used for the estimate.
    """
    x = torch.as_tensor(np.asarray(samples_xyz), dtype=torch.float64).reshape(-1, 3)[:max_points]
    floor = math.radians(resolution_deg) * EARTH_RADIUS_KM
    n = len(x)
    if n < 3:
        return floor
    k = min(n - 1, math.ceil(n ** (2.0 / 3.0) / 2.0))
    rows = np.arange(n)
    angles, _ = knn(x, x, k, angles=True, query_groups=rows, db_groups=rows, query_block=1024)  # itself excluded
    angle = torch.as_tensor(angles[:, k - 1]).median().item()
    return max(angle * EARTH_RADIUS_KM, floor)


def kde_log_density(samples_xyz, kappa: float, xyz, *, chunk_elements: int = 1 << 22) -> np.ndarray:
    """log p̂(x) (M,) nats per steradian of the vMF-kernel KDE of unit ``samples_xyz`` (N, 3) with
    concentration ``kappa`` (1/sr) at unit ``xyz`` (M, 3): log C(κ) − ln N + logsumexp_i κ(⟨x_i, x⟩ − 1),
    C(κ) = κ / (2π(1 − e^{−2κ})) as in geopipe.pipeline.sphere.vmf (same stable form), one matmul
    per chunk of ≈ ``chunk_elements`` kernel values instead of a (M, N, 3) product."""
    mu = torch.as_tensor(np.asarray(samples_xyz), dtype=torch.float64).reshape(-1, 3)
    x = torch.as_tensor(np.asarray(xyz), dtype=torch.float64).reshape(-1, 3)
    kap = torch.tensor(float(kappa), dtype=torch.float64)
    log_c = torch.log(kap) - torch.log(-2.0 * math.pi * torch.expm1(-2.0 * kap)) - math.log(len(mu))
    rows = max(1, int(chunk_elements) // len(mu))
    out = [log_c + torch.logsumexp(kap * (xb @ mu.T - 1.0), dim=1) for xb in torch.split(x, rows)]
    return torch.cat(out).numpy() if out else np.zeros(0)

"""A retrieval density on S²: the top-K neighbours' positions as a von Mises–Fisher kernel
mixture, so retrieval gets an NLL (nats per steradian), localizability and HDR ranks that
compare with the generative models.

``p(x) = Σ_k w_k vMF(x; μ_k, κ)`` with μ_k the k-th neighbour's position (unit vector), one
concentration κ (1/rad²; a kernel of angular width ≈ 1/√κ rad, i.e. R_E/√κ km) and weights
``w_k ∝ exp(−d_k / T)`` of the descriptor distances d_k (T = inf: equal weights). (κ, T) are
fitted on validation records by minimising the mean NLL of their true positions over a
log-spaced grid (deterministic, no optimiser). Neighbours with index −1 get weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.infer.localizability import localizability_from_logp
from geopipe.pipeline.sphere.geometry import latlon_to_xyz, xyz_to_latlon
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture, vmf_mixture_log_density, vmf_mixture_mode

__all__ = ["KAPPA_GRID", "TEMPERATURE_GRID", "KernelDensity", "kernel_weights", "neighbour_xyz", "log_density",
           "fit_kernel", "kernel_mode", "kernel_localizability"]

#: Candidate concentrations (1/rad²): kernel widths from ~6000 km down to ~0.2 km.
KAPPA_GRID = tuple(float(v) for v in np.logspace(0, 9, 37))
#: Candidate weight temperatures in descriptor-distance units (inf = equal weights).
TEMPERATURE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, math.inf)


@dataclass(frozen=True)
class KernelDensity:
    """Fitted kernel: concentration ``kappa`` (1/rad²), weight temperature ``temperature``,
    validation mean NLL (nats/sr) and the number of validation records it was fitted on."""

    kappa: float
    temperature: float
    val_nll: float
    n_val: int

    @property
    def width_km(self) -> float:
        """Angular kernel width 1/√κ expressed in km on the Earth."""
        return 6371.0088 / math.sqrt(self.kappa)


def kernel_weights(distances: np.ndarray, indices: np.ndarray, temperature: float) -> torch.Tensor:
    """(Q, K) float64 weights summing to 1 per row (rows without any neighbour are an error)."""
    d = np.asarray(distances, dtype=np.float64)
    valid = np.asarray(indices) >= 0
    if not valid.any(axis=1).all():
        raise GeopipeError("retrieval density: some queries have no neighbour (empty or fully excluded database)")
    logits = np.zeros_like(d) if math.isinf(temperature) else -np.nan_to_num(d, nan=0.0) / temperature
    logits = np.where(valid, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return torch.from_numpy(w / w.sum(axis=1, keepdims=True))


def neighbour_xyz(latlon: np.ndarray) -> torch.Tensor:
    """(Q, K, 2) degrees (NaN allowed for missing neighbours) → (Q, K, 3) float64 unit vectors."""
    ll = torch.from_numpy(np.nan_to_num(np.asarray(latlon, dtype=np.float64), nan=0.0))
    return latlon_to_xyz(ll)


def log_density(x: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor, kappa: float) -> torch.Tensor:
    """log p of points x (Q, 3) under each query's kernel mixture μ (Q, K, 3), w (Q, K) → (Q,) nats/sr."""
    k = torch.full(weights.shape, float(kappa), dtype=torch.float64)
    return vmf_mixture_log_density(x, mu, k, weights)


def fit_kernel(true_latlon: np.ndarray, nb_latlon: np.ndarray, distances: np.ndarray, indices: np.ndarray,
               kappas=KAPPA_GRID, temperatures=TEMPERATURE_GRID) -> KernelDensity:
    """Grid-fit (κ, T) on validation records: true positions (V, 2) degrees, their top-K
    neighbours' positions (V, K, 2), descriptor distances and indices (V, K)."""
    tl = np.asarray(true_latlon, dtype=np.float64)
    ok = np.isfinite(tl).all(axis=1) & (np.asarray(indices) >= 0).any(axis=1)
    if not ok.any():
        raise GeopipeError("retrieval density: no validation record with a known position and a neighbour to fit the kernel on")
    x = latlon_to_xyz(torch.from_numpy(tl[ok]))
    mu = neighbour_xyz(np.asarray(nb_latlon)[ok])
    best = None
    for t in temperatures:
        w = kernel_weights(np.asarray(distances)[ok], np.asarray(indices)[ok], t)
        for kappa in kappas:
            nll = float(-log_density(x, mu, w, kappa).mean())
            if best is None or nll < best[0]:
                best = (nll, kappa, t)
    return KernelDensity(kappa=float(best[1]), temperature=float(best[2]), val_nll=best[0], n_val=int(ok.sum()))


def kernel_mode(mu: torch.Tensor, weights: torch.Tensor, kappa: float) -> np.ndarray:
    """(Q, 2) degrees: the neighbour position with the highest mixture density."""
    k = torch.full(weights.shape, float(kappa), dtype=torch.float64)
    return xyz_to_latlon(vmf_mixture_mode(mu, k, weights)).numpy()


def kernel_localizability(mu: torch.Tensor, weights: torch.Tensor, kappa: float, x_true: torch.Tensor | None = None,
                          n_samples: int = 256, seed: int = 0) -> dict[str, np.ndarray]:
    """Monte-Carlo −H (nats), entropy bits, effective area km² and, with ``x_true`` (Q, 3),
    the log-likelihood of the truth and its HDR rank (fraction of samples denser than it)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.full(weights.shape, float(kappa), dtype=torch.float64)
    xs = sample_vmf_mixture(mu, k, weights, n_samples, generator=g)  # (Q, n, 3)
    q, n = xs.shape[:2]
    rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731 — same mixture for each sample
    logp = vmf_mixture_log_density(xs.reshape(q * n, 3), rep(mu), rep(k), rep(weights)).reshape(q, n)
    out = {name: v.numpy() for name, v in localizability_from_logp(logp).items()}
    if x_true is not None:
        lt = vmf_mixture_log_density(x_true, mu, k, weights)
        out["log_likelihood"] = lt.numpy()
        out["hdr_rank"] = (logp > lt[:, None]).double().mean(dim=1).numpy()
    return out

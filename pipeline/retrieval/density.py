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
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.infer.localizability import localizability_from_logp
from geopipe.pipeline.sphere.geometry import latlon_to_xyz, xyz_to_latlon
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture

__all__ = ["KAPPA_GRID", "TEMPERATURE_GRID", "TILE", "SAMPLE_GROUP", "GROUP_ENTRIES", "KernelDensity", "kernel_weights",
           "neighbour_xyz", "mixture_logp", "log_density", "fit_kernel_blocks", "fit_kernel", "kernel_mode", "sample_group",
           "kernel_localizability"]

#: Candidate concentrations (1/rad²): kernel widths from ~6000 km down to ~0.2 km.
KAPPA_GRID = tuple(float(v) for v in np.logspace(0, 9, 37))
#: Candidate weight temperatures in descriptor-distance units (inf = equal weights).
TEMPERATURE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, math.inf)
#: (query, point, component) triples per tile of :func:`mixture_logp` (about 12 MB of float64 per temporary).
TILE = 2**19
#: Most queries sampled together by :func:`kernel_localizability` (one generator per group).
SAMPLE_GROUP = 512
#: Most (query, component) weights of one sampling group.
GROUP_ENTRIES = 2**17


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


def _tile_sizes(b: int, s: int, m: int, tile: int) -> tuple[int, int, int]:
    """(queries, points, components) per tile with at most ``tile`` triples (at least one each)."""
    mb = max(1, min(m, tile))
    sb = max(1, min(s, tile // mb))
    return max(1, min(b, tile // (sb * mb))), sb, mb


def mixture_logp(x: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor, kappa: float, tile: int = TILE) -> torch.Tensor:
    """log Σ_k w_k vMF(x_s; μ_k, κ) of points x (Q, S, 3) under each query's mixture μ (Q, K, 3),
    w (Q, K) → (Q, S) nats/sr, float64.

    The stable component form of :func:`geopipe.pipeline.sphere.vmf.vmf_mixture_log_density`,
    ``log f_k(x) = ln κ + κ(⟨μ_k, x⟩ − 1) − ln(1e-8 + 2π(1 − e^{−2κ}))``, with the cosines of a
    tile as one batched matrix product, in tiles of at most ``tile`` (query, point, component)
    triples: memory stays bounded whatever S and K are; the components of one point are
    combined by logaddexp across tiles.
    """
    x, mu = x.to(torch.float64), mu.to(torch.float64)
    q, s, _ = x.shape
    m = mu.shape[1]
    kap = torch.tensor(float(kappa), dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    const = torch.log(kap.clamp_min(tiny)) - torch.log(1e-8 - 2.0 * math.pi * torch.expm1(-2.0 * kap))
    log_w = torch.log(weights.to(torch.float64).clamp_min(tiny))
    out = torch.empty((q, s), dtype=torch.float64)
    qb, sb, mb = _tile_sizes(q, s, m, tile)
    for a in range(0, q, qb):
        for c in range(0, s, sb):
            acc = None
            for e in range(0, m, mb):
                t = torch.bmm(x[a:a + qb, c:c + sb], mu[a:a + qb, e:e + mb].transpose(1, 2))  # cosines (qb, sb, mb)
                part = torch.logsumexp(t.sub_(1.0).mul_(kap).add_(log_w[a:a + qb, None, e:e + mb]), dim=-1)
                acc = part if acc is None else torch.logaddexp(acc, part)
            out[a:a + qb, c:c + sb] = acc + const
    return out


def log_density(x: torch.Tensor, mu: torch.Tensor, weights: torch.Tensor, kappa: float) -> torch.Tensor:
    """log p of points x (Q, 3) under each query's kernel mixture μ (Q, K, 3), w (Q, K) → (Q,) nats/sr."""
    return mixture_logp(x[:, None], mu, weights, kappa)[:, 0]


def _fit_rows(true_latlon, nb_latlon, distances, indices):
    """The validation rows with a known position and a neighbour: (x (V, 3), μ (V, K, 3), d, idx)."""
    tl = np.asarray(true_latlon, dtype=np.float64)
    ok = np.isfinite(tl).all(axis=1) & (np.asarray(indices) >= 0).any(axis=1)
    return (latlon_to_xyz(torch.from_numpy(tl[ok])), neighbour_xyz(np.asarray(nb_latlon)[ok]), np.asarray(distances)[ok],
            np.asarray(indices)[ok])


def fit_kernel_blocks(blocks: Iterable[tuple], kappas=KAPPA_GRID, temperatures=TEMPERATURE_GRID) -> KernelDensity:
    """Grid-fit (κ, T) on validation records given block by block: each block is (true
    positions (V, 2) degrees, neighbour positions (V, K, 2), descriptor distances and indices
    (V, K)). The mean NLL of each grid point is summed over blocks, so memory is one block's."""
    sums, n = np.zeros((len(temperatures), len(kappas))), 0
    for block in blocks:
        x, mu, d, idx = _fit_rows(*block)
        if x.shape[0] == 0:
            continue
        n += x.shape[0]
        for i, t in enumerate(temperatures):
            w = kernel_weights(d, idx, t)
            for j, kappa in enumerate(kappas):
                sums[i, j] += float(-log_density(x, mu, w, kappa).sum())
    if n == 0:
        raise GeopipeError("retrieval density: no validation record with a known position and a neighbour to fit the kernel on")
    best = None
    for i, t in enumerate(temperatures):
        for j, kappa in enumerate(kappas):
            nll = float(sums[i, j] / n)
            if best is None or nll < best[0]:
                best = (nll, kappa, t)
    return KernelDensity(kappa=float(best[1]), temperature=float(best[2]), val_nll=best[0], n_val=n)


def fit_kernel(true_latlon: np.ndarray, nb_latlon: np.ndarray, distances: np.ndarray, indices: np.ndarray,
               kappas=KAPPA_GRID, temperatures=TEMPERATURE_GRID) -> KernelDensity:
    """Grid-fit (κ, T) on validation records: true positions (V, 2) degrees, their top-K
    neighbours' positions (V, K, 2), descriptor distances and indices (V, K)."""
    return fit_kernel_blocks([(true_latlon, nb_latlon, distances, indices)], kappas, temperatures)


def kernel_mode(mu: torch.Tensor, weights: torch.Tensor, kappa: float) -> np.ndarray:
    """(Q, 2) degrees: the neighbour position with the highest mixture density (the first
    among equals), scored in bounded tiles whatever K is."""
    if mu.shape[1] == 1:
        return xyz_to_latlon(mu[:, 0]).numpy()
    best = mixture_logp(mu, mu, weights, kappa).argmax(dim=-1)
    return xyz_to_latlon(mu[torch.arange(mu.shape[0]), best]).numpy()


def sample_group(k: int) -> int:
    """Queries per sampling group of :func:`kernel_localizability` with ``k`` components: at most
    :data:`SAMPLE_GROUP` and at most ``GROUP_ENTRIES // k`` (at least one)."""
    return max(1, min(SAMPLE_GROUP, GROUP_ENTRIES // max(int(k), 1)))


def kernel_localizability(mu: torch.Tensor, weights: torch.Tensor, kappa: float, x_true: torch.Tensor | None = None,
                          n_samples: int = 256, seed: int = 0, first: int = 0) -> dict[str, np.ndarray]:
    """Monte-Carlo −H (nats), entropy bits, effective area km² and, with ``x_true`` (Q, 3),
    the log-likelihood of the truth and its HDR rank (fraction of samples denser than it).

    Queries are sampled in groups of :func:`sample_group` ``(K)``; the group holding query
    positions [g, g + G) draws from a generator seeded ``seed + g``, where ``first`` is the
    position of this call's first query (a multiple of G): the numbers of a query do not depend
    on how the queries were cut into calls.
    """
    q, m = weights.shape
    group = sample_group(m)
    if first % group:
        raise ValueError(f"kernel_localizability: first={first} is not a multiple of the sampling group {group}")
    k = torch.full(weights.shape, float(kappa), dtype=torch.float64)
    parts = []
    for a in range(0, q, group):
        b = min(q, a + group)
        g = torch.Generator().manual_seed(seed + first + a)
        xs = sample_vmf_mixture(mu[a:b], k[a:b], weights[a:b], n_samples, generator=g)  # (G, n, 3)
        parts.append(mixture_logp(xs, mu[a:b], weights[a:b], kappa))
    logp = torch.cat(parts) if parts else torch.zeros((0, n_samples), dtype=torch.float64)
    out = {name: v.numpy() for name, v in localizability_from_logp(logp).items()}
    if x_true is not None:
        lt = log_density(x_true, mu, weights, kappa)
        out["log_likelihood"] = lt.numpy()
        out["hdr_rank"] = (logp > lt[:, None]).double().mean(dim=1).numpy()
    return out

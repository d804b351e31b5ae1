"""Localizability (negative entropy) and HDR ranks from sampled log densities
(docs/methods.md#localizability, docs/methods.md#calibration).

For one record with samples y_j ~ p(·|c), j = 1…N, and their log densities ℓ_j = log p(y_j|c)
(nats per steradian on S²):

* −H ≈ mean_j ℓ_j (``neg_entropy_nats``; Monte-Carlo, N = 1024 by default);
* entropy in bits H / ln 2;
* effective area exp(H)·R_E² km² — the area of a uniform region with the same entropy
  (uniform on S²: H = ln 4π → 4πR_E² ≈ 5.1e8 km²). R_E = 6371.0088 km.
* HDR rank of the truth = #{j : ℓ_j > log p(truth)} / N; the truth is in the p-HDR iff rank ≤ p.

R³ models (flow, diffusion) are scored on their own draws y_j ~ p in R³, unprojected
(``method.sample_native``): a projected draw is not distributed as p, so neither the entropy
nor the HDR rank would mean anything with it. Their −H is then per unit volume (nats), not
comparable with S² models (docs/methods.md#units), and the effective area is undefined (NaN).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, project

if TYPE_CHECKING:
    import torch

__all__ = [
    "neg_entropy_nats",
    "entropy_bits",
    "effective_area_km2",
    "localizability_from_logp",
    "hdr_rank",
    "Localization",
    "localize",
]


def _is_tensor(x) -> bool:
    """A torch tensor, told without importing torch (evaluate's numpy path never loads it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check(sample_logp) -> None:
    if sample_logp.ndim != 2 or sample_logp.shape[1] == 0:
        raise ValueError(f"sample log densities must have shape (B, N>0), got {tuple(sample_logp.shape)}")


def neg_entropy_nats(sample_logp: torch.Tensor) -> torch.Tensor:
    """−H estimate (B,) nats: mean of the (B, N) sample log densities."""
    _check(sample_logp)
    return sample_logp.mean(dim=1)


def entropy_bits(sample_logp: torch.Tensor) -> torch.Tensor:
    """Entropy H / ln 2 (B,) bits from (B, N) sample log densities."""
    return -neg_entropy_nats(sample_logp) / math.log(2.0)


def effective_area_km2(sample_logp: torch.Tensor, space: str = "sphere") -> torch.Tensor:
    """exp(H)·R_E² (B,) km², the area of the uniform region with the same entropy; NaN for
    an R³ density (``space="r3"``, per unit volume: no area)."""
    import torch

    area = torch.exp(-neg_entropy_nats(sample_logp)) * EARTH_RADIUS_KM**2
    return area if space == "sphere" else torch.full_like(area, math.nan)


def localizability_from_logp(sample_logp: torch.Tensor, space: str = "sphere") -> dict[str, torch.Tensor]:
    """{"neg_entropy_nats", "entropy_bits", "effective_area_km2"} → (B,) float64 CPU tensors.

    ``space`` of the density: "sphere" (per steradian) or "r3" (per unit volume: no area, NaN).
    """
    import torch

    lp = sample_logp.detach().to(device="cpu", dtype=torch.float64)
    return {"neg_entropy_nats": neg_entropy_nats(lp), "entropy_bits": entropy_bits(lp), "effective_area_km2": effective_area_km2(lp, space)}


def hdr_rank(true_logp, sample_logp):
    """Fraction (B,) of samples denser than the truth: mean_j 1[ℓ_j > log p(truth)] — the one
    definition, used by predict (torch) and by evaluation (numpy).

    ``true_logp`` (B,) and ``sample_logp`` (B, N) log densities (nats) of the truth and of N
    samples drawn from the same predicted distribution, as torch tensors or array-likes: a
    tensor ``sample_logp`` gives a tensor of its dtype, anything else a float64 numpy array.
    The truth lies in the empirical p-HDR iff hdr_rank ≤ p (see
    :mod:`geopipe.pipeline.eval.calibration`). A NaN sample density never counts as denser.
    """
    if not _is_tensor(sample_logp):  # numpy in, numpy out: evaluate loads no torch
        ls, lt = np.asarray(sample_logp, dtype=np.float64), np.asarray(true_logp, dtype=np.float64).reshape(-1)
        _check_pair(lt, ls)
        return (ls > lt[:, None]).mean(axis=1)
    import torch

    ls = sample_logp
    lt = true_logp if isinstance(true_logp, torch.Tensor) else torch.as_tensor(np.asarray(true_logp, dtype=np.float64)).reshape(-1)
    _check_pair(lt, ls)
    return (ls > lt.unsqueeze(1)).to(ls.dtype).mean(dim=1)


def _check_pair(true_logp, sample_logp) -> None:
    _check(sample_logp)
    if tuple(true_logp.shape) != tuple(sample_logp.shape[:1]):
        raise ValueError(f"hdr_rank: true log densities must have shape ({sample_logp.shape[0]},), got {tuple(true_logp.shape)}")


@dataclass(frozen=True)
class Localization:
    """Result of :func:`localize` for B records and N samples each.

    samples (B, N, 3) unit vectors; sample_logp (B, N) nats; neg_entropy_nats, entropy_bits,
    effective_area_km2 (B,); true_logp and hdr_rank (B,) when the truth was given, else None.
    """

    samples: torch.Tensor
    sample_logp: torch.Tensor
    neg_entropy_nats: torch.Tensor
    entropy_bits: torch.Tensor
    effective_area_km2: torch.Tensor
    true_logp: torch.Tensor | None = None
    hdr_rank: torch.Tensor | None = None


def localize(method, model, cond: torch.Tensor, n_samples: int = 1024, *, x_true: torch.Tensor | None = None,
             steps: int = 16, sampler: str | None = None, batch_size: int = 4096, rtol: float = 1e-5,
             atol: float = 1e-5, generator: torch.Generator | None = None, keys=None, solver: str = "dopri5") -> Localization:
    """Draw ``n_samples`` unguided samples per record of cond (B, C) and score them exactly.

    Records are processed in chunks of ⌈batch_size / n_samples⌉, each chunk's records × samples
    flattened into one sampling batch and one likelihood batch. Draws are scored where the density
    lives (R³ models: unprojected, see the module docstring); ``samples`` are the unit vectors.
    ``x_true`` (B, 3) unit vectors additionally gives the truth's log density and HDR rank.
    ``solver``, ``rtol``, ``atol``: the likelihood ODE's (:data:`geopipe.pipeline.model.likelihood.ADAPTIVE_SOLVERS`).
    """
    import torch

    if n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
    per = max(1, batch_size // n_samples)
    xs, lps = [], []
    for i in range(0, cond.shape[0], per):
        c = cond[i : i + per]
        y = method.sample_native(model, c, n_samples, steps=steps, guidance=0.0, sampler=sampler, generator=generator,
                                 keys=None if keys is None else keys[i : i + per])
        lp = method.log_likelihood(model, y.reshape(-1, 3), c.repeat_interleave(n_samples, dim=0), rtol=rtol, atol=atol,
                                   method=solver)
        xs.append(project(y))
        lps.append(lp.reshape(-1, n_samples))
    samples, sample_logp = torch.cat(xs), torch.cat(lps)
    true_logp = rank = None
    if x_true is not None:
        true_logp = torch.cat([
            method.log_likelihood(model, x_true[i : i + batch_size], cond[i : i + batch_size], rtol=rtol, atol=atol, method=solver)
            for i in range(0, cond.shape[0], batch_size)
        ])
        rank = hdr_rank(true_logp, sample_logp)
    return Localization(samples, sample_logp, neg_entropy_nats(sample_logp), entropy_bits(sample_logp),
                        effective_area_km2(sample_logp, method.space), true_logp, rank)

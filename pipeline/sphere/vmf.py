"""von Mises–Fisher densities and sampling on S² (docs/methods.md#vmf).

Densities are in nats per steradian. Parameters: mean directions μ (…, M, 3) unit vectors,
concentrations κ (…, M) > 0, mixture weights w (…, M) summing to 1 (M = 1 for a single vMF).
"""

from __future__ import annotations

import math

import torch

from geopipe.pipeline.sphere.geometry import project, tangent_project

__all__ = [
    "vmf_log_density",
    "vmf_mixture_log_density",
    "vmf_mixture_nll",
    "vmf_mixture_mode",
    "sample_vmf",
    "sample_vmf_mixture",
]

_LOG_4PI = math.log(4.0 * math.pi)


def vmf_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log f(x; μ, κ) = ln(κ + 1e-8) − ln 4π − LS(κ) + κ⟨μ, x⟩, broadcasting.

    x, μ (…, 3); κ (…). LS(κ) = κ + ln(1e-8 + (1 − e^{−2κ})/2) is a stable ln sinh κ
    (expm1 keeps small κ accurate); the κ⟨μ,x⟩ − κ difference never overflows.
    """
    ls = kappa + torch.log(1e-8 - torch.expm1(-2.0 * kappa) / 2.0)
    return torch.log(kappa + 1e-8) - _LOG_4PI - ls + kappa * (mu * x).sum(dim=-1)


def vmf_mixture_log_density(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log Σ_i w_i f_i(x) with the stable component form, computed by logsumexp.

    x (B, 3); μ (B, M, 3); κ, w (B, M) → (B,) nats per steradian.
    log f_i(x) = ln κ_i + κ_i(⟨μ_i, x⟩ − 1) − ln(1e-8 + 2π(1 − e^{−2κ_i})).
    """
    tiny = torch.finfo(kappa.dtype).tiny
    cos = (mu * x.unsqueeze(-2)).sum(dim=-1)
    log_f = (
        torch.log(kappa.clamp_min(tiny))
        + kappa * (cos - 1.0)
        - torch.log(1e-8 - 2.0 * math.pi * torch.expm1(-2.0 * kappa))
    )
    return torch.logsumexp(torch.log(weights.clamp_min(tiny)) + log_f, dim=-1)


def vmf_mixture_nll(x: torch.Tensor, mu: torch.Tensor, kappa: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood (scalar, nats) of unit x (B, 3) under the mixtures."""
    return -vmf_mixture_log_density(x, mu, kappa, weights).mean()


def vmf_mixture_mode(mu: torch.Tensor, kappa: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Point prediction: the component mean with the highest mixture density. (B, 3) unit.

    Each μ_j (B, M, 3) is scored under the full mixture; M = 1 returns μ itself.
    """
    b, m, _ = mu.shape
    if m == 1:
        return mu[:, 0]
    pts = mu.reshape(b * m, 3)
    rep = lambda t: t.repeat_interleave(m, dim=0)  # noqa: E731 — same mixture for each candidate
    score = vmf_mixture_log_density(pts, rep(mu), rep(kappa), rep(weights)).reshape(b, m)
    best = score.argmax(dim=-1)
    return mu[torch.arange(b, device=mu.device), best]


def _wood_w(kappa: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Wood (1994) rejection sampling of w = ⟨μ, x⟩ for S² (p = 3), all entries of κ (K,), float64.

    b = 2/(√(4κ²+4) + 2κ), x0 = (1−b)/(1+b), c = κ x0 + 2 ln(1 − x0²), z ~ Beta(1,1) = U(0,1),
    w = (1 − (1+b)z)/(1 − (1−b)z); accept when κw + 2 ln(1 − x0 w) − c ≥ ln U. The loop redraws
    only the pending entries until all are accepted (acceptance is > 0.9 for every κ on S²).
    """
    k = kappa.to(torch.float64)
    b = 2.0 / (torch.sqrt(4.0 * k * k + 4.0) + 2.0 * k)
    x0 = (1.0 - b) / (1.0 + b)
    c = k * x0 + 2.0 * torch.log1p(-x0 * x0)
    w = torch.empty_like(k)
    pending = torch.arange(k.numel(), device=k.device)
    while pending.numel() > 0:
        z = torch.rand(pending.numel(), generator=generator, dtype=k.dtype, device=k.device)
        u = torch.rand(pending.numel(), generator=generator, dtype=k.dtype, device=k.device)
        bp, x0p, kp = b[pending], x0[pending], k[pending]
        wp = (1.0 - (1.0 + bp) * z) / (1.0 - (1.0 - bp) * z)
        ok = kp * wp + 2.0 * torch.log1p(-x0p * wp) - c[pending] >= torch.log(u)
        w[pending[ok]] = wp[ok]
        pending = pending[~ok]
    return w


def sample_vmf(mu: torch.Tensor, kappa: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw x ~ vMF(μ, κ) for each row: μ (K, 3) unit, κ (K,) → (K, 3) unit, dtype of μ.

    x = √(1 − w²) v + w μ with w from Wood's scheme and v uniform on the circle ⟂ μ.
    """
    w = _wood_w(kappa, generator)
    mu64 = mu.to(torch.float64)
    g = torch.randn(mu64.shape, generator=generator, dtype=torch.float64, device=mu.device)
    v = project(tangent_project(mu64, g))
    x = torch.sqrt((1.0 - w) * (1.0 + w)).clamp_min(0.0).unsqueeze(-1) * v + w.unsqueeze(-1) * mu64
    return project(x).to(mu.dtype)


def sample_vmf_mixture(
    mu: torch.Tensor, kappa: torch.Tensor, weights: torch.Tensor, n: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """n draws per record from each mixture: μ (B, M, 3), κ, w (B, M) → (B, n, 3) unit.

    A component is drawn from the weights first, then a vMF draw from it.
    """
    b, m, _ = mu.shape
    comp = torch.multinomial(weights.to(torch.float64), n, replacement=True, generator=generator)  # (B, n)
    rows = torch.arange(b, device=mu.device).unsqueeze(1).expand(b, n)
    x = sample_vmf(mu[rows, comp].reshape(b * n, 3), kappa[rows, comp].reshape(b * n), generator=generator)
    return x.reshape(b, n, 3)

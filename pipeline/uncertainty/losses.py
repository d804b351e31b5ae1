"""Generalised-Gaussian (GGD) negative log-likelihood and the BayesCap losses (torch).

Density: ``p(y) = β / (2α Γ(1/β)) · exp(−(|y − ỹ|/α)^β)``, variance ``α² Γ(3/β) / Γ(1/β)``.
The heads output ``h_a`` (read as **1/α**) and ``h_b`` (β), both ≥ 0 (ReLU); per element

    term = clamp(g, resi_min, resi_max),  g = (r · inv_α)^β  (``power``, default)
                                         or r · inv_α · β   (``linear_official``)
    loss = term − log inv_α − log β + lgamma(1/β),   inv_α = h_a + eps_a, β = h_b + eps_b

with r = |μ − t|, mean-reduced. The official BayesCap/ProbVLM code uses the linear form; it
drives β to the constant 0.6842 whatever the residuals (docs/retrieval_uncertainty.md), so
the power form of the paper's equations is our default. In the power form ``g = exp(β (log r + log inv_α))``
for r > 0 and 0 for r = 0 (no 0^β gradient NaNs). A non-finite loss raises instead of
returning None as the official code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["RESIDUAL_FORMS", "GGDLossConfig", "ggd_nll", "ggd_elementwise", "ggd_loss", "temp_comb_loss",
           "bc_loss", "bcc_loss", "log_ggd_variance", "sample_ggd"]

RESIDUAL_FORMS = ("power", "linear_official")


@dataclass(frozen=True)
class GGDLossConfig:
    """Loss settings: residual form, eps on the heads, clamp of the residual term, λ1 (L1
    identity weight) and λ2 (GGD weight)."""

    residual_form: str = "power"
    eps_a: float = 1e-4
    eps_b: float = 1e-4
    resi_min: float = 1e-4
    resi_max: float = 1e3
    lambda1: float = 1.0
    lambda2: float = 1e-4

    def __post_init__(self):
        if self.residual_form not in RESIDUAL_FORMS:
            raise ValueError(f"unknown residual_form {self.residual_form!r}; choose one of {list(RESIDUAL_FORMS)}")


def ggd_nll(r: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Element-wise GGD NLL from α, β (no clamp): ``(r/α)^β − log β + log α + lgamma(1/β)``,
    plus ``log 2`` when ``exact`` (the true −log density, nats)."""
    out = (r / alpha) ** beta - torch.log(beta) + torch.log(alpha) + torch.lgamma(1.0 / beta)
    return out + math.log(2.0) if exact else out


def ggd_elementwise(mu: torch.Tensor, h_a: torch.Tensor, h_b: torch.Tensor, target: torch.Tensor,
                    cfg: GGDLossConfig = GGDLossConfig()) -> torch.Tensor:
    """Per-element loss from head outputs (same shapes), see the module docstring."""
    inv_alpha = h_a + cfg.eps_a
    beta = h_b + cfg.eps_b
    r = (mu - target).abs()
    if cfg.residual_form == "power":
        zero = r == 0  # NaN residuals stay NaN and are caught by ggd_loss
        log_r = torch.log(torch.where(zero, torch.full_like(r, 1e-12), r))
        g = torch.where(zero, torch.zeros_like(r), torch.exp(beta * (log_r + torch.log(inv_alpha))))
    else:
        g = r * inv_alpha * beta
    term = g.clamp(cfg.resi_min, cfg.resi_max)
    return term - torch.log(inv_alpha) - torch.log(beta) + torch.lgamma(1.0 / beta)


def ggd_loss(mu, h_a, h_b, target, cfg: GGDLossConfig = GGDLossConfig()) -> torch.Tensor:
    """Mean of :func:`ggd_elementwise`; raises FloatingPointError when it is not finite."""
    loss = ggd_elementwise(mu, h_a, h_b, target, cfg).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"generalised-Gaussian loss is {loss.item()} (non-finite head outputs or inputs)")
    return loss


def temp_comb_loss(mu, h_a, h_b, target1, target2, cfg: GGDLossConfig = GGDLossConfig()) -> torch.Tensor:
    """``λ1 · mean|μ − target1| + λ2 · GGD(μ, h_a, h_b; target2)`` (identity + likelihood)."""
    return cfg.lambda1 * (mu - target1).abs().mean() + cfg.lambda2 * ggd_loss(mu, h_a, h_b, target2, cfg)


def bc_loss(out1: tuple, e1: torch.Tensor, e2: torch.Tensor, cfg: GGDLossConfig = GGDLossConfig()) -> torch.Tensor:
    """BayesCap with viewpoint pairs: reconstruct view 1, explain view 2. ``out1`` = (μ, h_a, h_b) of e1."""
    return temp_comb_loss(*out1, e1, e2, cfg)


def bcc_loss(out1: tuple, out2: tuple, e1: torch.Tensor, e2: torch.Tensor, cfg: GGDLossConfig = GGDLossConfig()) -> torch.Tensor:
    """BayesCapCycle: the mean of both directions of :func:`bc_loss` through the same network."""
    return 0.5 * (bc_loss(out1, e1, e2, cfg) + bc_loss(out2, e2, e1, cfg))


def log_ggd_variance(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """log σ² = 2 log α + lgamma(3/β) − lgamma(1/β), finite where σ² itself overflows."""
    return 2.0 * torch.log(alpha) + torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta)


def sample_ggd(mu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, n: int,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """n draws (n, *shape) of GGD(μ, α, β): z = μ + s·α·g^(1/β), g ~ Gamma(1/β, 1), s = ±1."""
    shape = (n, *torch.broadcast_shapes(mu.shape, alpha.shape, beta.shape))
    conc = (1.0 / beta).expand(shape).to(torch.float64)
    if generator is not None:  # torch.distributions has no generator argument: derive a seed from it
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
    g = torch.distributions.Gamma(conc, torch.ones_like(conc)).sample()
    sign = torch.where(torch.rand(shape, dtype=torch.float64, generator=generator) < 0.5, -1.0, 1.0)
    return mu + sign * alpha * g ** (1.0 / beta)

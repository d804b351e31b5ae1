"""Per-record uncertainty of a trained BayesCap network, in log space (float64).

Aleatoric per feature: σ²_alea = α² Γ(3/β)/Γ(1/β) from the pass-averaged head outputs, with
α, β read from the heads by a ``convention``:

* ``probvlm`` (default): α = clip(1/(h_a + 1e-5), 1e-4, 5), β = clip(h_b + 0.1, 0.1, 5);
* ``bayescap``: α = 1/(h_a + 1e-5), β = h_b + 1e-2;
* ``train_consistent``: α = 1/(h_a + eps_a), β = h_b + eps_b (the training eps).

Epistemic per feature (MC dropout, M passes with only the Dropout modules in train mode):
``thesis`` = population variance of μ over the passes; ``probvlm_code`` = the official code's
√(var_unbiased(σ²_alea per pass) · var_unbiased(μ)). Total = σ²_alea + σ²_epi (logaddexp).
Record score: ``log_u`` = mean over features of log σ²_tot (the log of the geometric mean;
``aggregate="arithmetic"`` uses the log of the arithmetic mean), and likewise ``log_u_alea``,
``log_u_epi`` (−inf when the epistemic variance is zero, e.g. one pass).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from geopipe.pipeline.uncertainty.losses import log_ggd_variance
from geopipe.schemas.predictions import score_columns

__all__ = ["CONVENTIONS", "EPISTEMIC_MODES", "heads_to_alpha_beta", "log_aleatoric", "mc_passes", "population_variance",
           "aggregate_log", "score_embeddings"]

CONVENTIONS = ("probvlm", "bayescap", "train_consistent")
EPISTEMIC_MODES = ("thesis", "probvlm_code")


def heads_to_alpha_beta(h_a: torch.Tensor, h_b: torch.Tensor, convention: str = "probvlm", eps_a: float = 1e-4,
                        eps_b: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(α, β) from raw head outputs by ``convention`` (see the module docstring)."""
    if convention == "probvlm":
        return (1.0 / (h_a + 1e-5)).clamp(1e-4, 5.0), (h_b + 0.1).clamp(0.1, 5.0)
    if convention == "bayescap":
        return 1.0 / (h_a + 1e-5), h_b + 1e-2
    if convention == "train_consistent":
        return 1.0 / (h_a + eps_a), h_b + eps_b
    raise ValueError(f"unknown scoring convention {convention!r}; choose one of {list(CONVENTIONS)}")


def log_aleatoric(h_a: torch.Tensor, h_b: torch.Tensor, convention: str = "probvlm") -> torch.Tensor:
    """log σ²_alea per feature from head outputs (float64)."""
    alpha, beta = heads_to_alpha_beta(h_a.double(), h_b.double(), convention)
    return log_ggd_variance(alpha, beta)


def _dropout_only_train(model: nn.Module) -> None:
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.train()


@torch.no_grad()
def mc_passes(model: nn.Module, x: torch.Tensor, passes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(μ, h_a, h_b) each (M, B, d): M stochastic passes (dropout on) or one deterministic pass (M = 1)."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if passes == 1:
        model.eval()
        return tuple(t.unsqueeze(0) for t in model(x))
    _dropout_only_train(model)
    xs = x.repeat(passes, 1)  # one batched forward: each copy draws its own dropout mask
    outs = [t.reshape(passes, *x.shape[:-1], -1) for t in model(xs)]
    model.eval()
    return outs[0], outs[1], outs[2]


def population_variance(passes: torch.Tensor) -> torch.Tensor:
    """Variance over the first axis with ddof = 0."""
    return passes.double().var(dim=0, unbiased=False)


def aggregate_log(log_values: torch.Tensor, aggregate: str = "geometric") -> torch.Tensor:
    """(B, d) per-feature log values → (B,): mean (log of the geometric mean) or log of the arithmetic mean."""
    if aggregate == "geometric":
        return log_values.mean(dim=-1)
    if aggregate == "arithmetic":
        return torch.logsumexp(log_values, dim=-1) - math.log(log_values.shape[-1])
    raise ValueError(f"unknown aggregate {aggregate!r}; choose geometric or arithmetic")


def _log(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, torch.log(v.clamp_min(1e-300)), torch.full_like(v, -math.inf))


@torch.no_grad()
def score_embeddings(model: nn.Module, embeddings: np.ndarray, passes: int = 15, convention: str = "probvlm",
                     epistemic_mode: str = "thesis", aggregate: str = "geometric", batch: int = 4096,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """The predictions schema's ``bayescap`` score columns ``{"log_u", "log_u_alea", "log_u_epi"}``,
    (N,) float64 each, for (N, d) embeddings."""
    if epistemic_mode not in EPISTEMIC_MODES:
        raise ValueError(f"unknown epistemic_mode {epistemic_mode!r}; choose one of {list(EPISTEMIC_MODES)}")
    torch.manual_seed(seed)
    out = {k: [] for k in score_columns("bayescap")}
    x_all = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    for s in range(0, x_all.shape[0], batch):
        mu, h_a, h_b = mc_passes(model, x_all[s:s + batch], passes)
        log_alea = log_aleatoric(h_a.double().mean(0), h_b.double().mean(0), convention)
        if epistemic_mode == "thesis":
            log_epi = _log(population_variance(mu))
        elif passes > 1:
            per_pass = torch.exp(log_aleatoric(h_a, h_b, convention))
            log_epi = 0.5 * (_log(per_pass.var(dim=0)) + _log(mu.double().var(dim=0)))
        else:
            log_epi = torch.full_like(log_alea, -math.inf)
        log_tot = torch.logaddexp(log_alea, log_epi)
        out["log_u"].append(aggregate_log(log_tot, aggregate))
        out["log_u_alea"].append(aggregate_log(log_alea, aggregate))
        out["log_u_epi"].append(aggregate_log(log_epi, aggregate))
    return {k: torch.cat(v).numpy() if v else np.zeros(0) for k, v in out.items()}

"""Classifier-free guidance (docs/methods.md#guidance).

Guided output with scale w: ψ_w = (1 + w) ψ(y, γ, c) − w ψ(y, γ, 0) = ψ_c + w (ψ_c − ψ_u).
The same rule applies to ε̂ (diffusion) and to γ-velocities (FM / RFM), and inside the likelihood
ODE. The unconditional branch uses the all-zero embedding (the training-time dropout value).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Field", "cfg_combine", "guided_field"]

#: A network field: (y (B, D), γ (B,)) → (B, D) (ε̂ or γ-velocity).
Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cfg_combine(psi_c: torch.Tensor, psi_u: torch.Tensor, w: float) -> torch.Tensor:
    """ψ_c + w (ψ_c − ψ_u): conditional and unconditional outputs (B, D) → guided (B, D)."""
    return psi_c + w * (psi_c - psi_u)


def guided_field(model: torch.nn.Module, cond: torch.Tensor, w: float = 0.0) -> Field:
    """Bind a network ``model(y, γ, cond)`` and embeddings ``cond`` (B, C) into a guided field.

    For w ≠ 0 the batch is duplicated into one network call (first half ``cond``, second half
    zeros); the concatenated conditioning is built once here, not at every step. For w == 0 the
    unconditional branch is not evaluated at all.
    """
    w = float(w)
    if w == 0.0:
        return lambda y, gamma: model(y, gamma, cond)
    cond2 = torch.cat((cond, torch.zeros_like(cond)), dim=0)

    def field(y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat((y, y), dim=0), torch.cat((gamma, gamma), dim=0), cond2)
        psi_c, psi_u = out.chunk(2, dim=0)
        return cfg_combine(psi_c, psi_u, w)

    return field

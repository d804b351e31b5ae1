"""The hybrid network: a per-record mixture of neighbour kernels, embedding-driven vMF components
and a uniform floor (docs/methods.md#hybrid).

forward(cond (B, D + F·k)) reads the standardised embedding z (B, D) and the neighbour block
(:mod:`geopipe.pipeline.model.neighbours`) and returns :class:`HybridParams`: k·S + M vMF
components (S kernels of learned widths and weights at each of the k neighbours' locations, a
heavy-tailed kernel per neighbour, and M means predicted from the embedding alone, which can
reach places no neighbour is at) and k·S + M + 1 log weights, the last one of the uniform's. The gallery the neighbours come from travels in the state dict
(``gallery_emb`` (N, D) float16 unit rows, ``gallery_xyz`` (N, 3)), so one checkpoint file is
the whole model.

Per-neighbour features: similarity, its gap to the best, rank, and the neighbour's support
from the block (how much of the neighbour set lies around it; computed with the search).

Dropout on the embedding's projection (training only): without it the network learns which
neighbour is right for each training embedding (geoclip world, 1,000 steps: training loss −7.4
against −6.8 nats on held-out rows of the same store); with 0.5 the two meet (−7.28 / −7.23 at
2,000 steps) and the held-out density is sharper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geopipe.pipeline.model.neighbours import FEATURES_PER_NEIGHBOUR, split_block
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM

__all__ = ["HybridNet", "HybridParams", "WIDTH_RANGE_KM", "hybrid_log_density"]

#: Kernel widths σ (km) the network can give a component: κ = (R/σ)².
WIDTH_RANGE_KM = (0.02, 5000.0)
_NEIGHBOUR_FEATURES = 3 + FEATURES_PER_NEIGHBOUR - 5
_NEIGHBOUR_WIDTH = 64


@dataclass(frozen=True)
class HybridParams:
    """mu (B, C, 3) unit, kappa (B, C) float64, log_w (B, C + 1) float64 (last: the uniform's)."""

    mu: Tensor
    kappa: Tensor
    log_w: Tensor


_LOG_2PI = math.log(2.0 * math.pi)
_LOG_4PI = math.log(4.0 * math.pi)


def hybrid_log_density(x: Tensor, p: HybridParams) -> Tensor:
    """log p(x) (B,) float64 nats per steradian of unit x (B, 3) under :class:`HybridParams` ``p``.

    Each vMF term in the small-angle-exact form ln κ − ln 2π − ln(1 − e^{−2κ}) − κ‖x − μ‖²/2
    (‖x − μ‖²/2 = 1 − ⟨μ, x⟩ without cancellation: a 20 m kernel is resolved in float32 inputs).
    """
    x64, mu = x.double()[:, None, :], p.mu.double()
    k = p.kappa
    log_f = torch.log(k) - _LOG_2PI - torch.log(-torch.expm1(-2.0 * k)) - 0.5 * k * ((x64 - mu) ** 2).sum(-1)
    terms = torch.cat([p.log_w[:, :-1] + log_f, p.log_w[:, -1:] - _LOG_4PI], dim=1)
    return torch.logsumexp(terms, dim=1)


def _width_to_kappa(raw: Tensor) -> Tensor:
    lo, hi = (math.log(v) for v in WIDTH_RANGE_KM)
    log_sigma = lo + (hi - lo) * torch.sigmoid(raw.double())
    return torch.exp(2.0 * (math.log(EARTH_RADIUS_KM) - log_sigma))


class _Residual(nn.Module):
    def __init__(self, d: int, expansion: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, expansion * d), nn.GELU(), nn.Linear(expansion * d, d))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.mlp(self.norm(h))


class HybridNet(nn.Module):
    """cond (B, D + F·k) → :class:`HybridParams` with C = k·S + M components (S kernels per neighbour)."""

    def __init__(self, embed_dim: int, dim: int, depth: int, expansion: int, *, neighbours: int, components: int,
                 gallery_rows: int, scales: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed_dim, self.k, self.m, self.s = embed_dim, neighbours, components, scales
        self.inp = nn.Linear(embed_dim, dim)
        self.drop = nn.Dropout(dropout)  # training only: the embedding's projection, before the trunk
        self.trunk = nn.Sequential(*(_Residual(dim, expansion) for _ in range(depth)), nn.LayerNorm(dim))
        self.global_head = nn.Linear(dim, 5 * components + 1)  # mu (3M), width (M), logit (M), uniform logit (1)
        w = _NEIGHBOUR_WIDTH
        self.nbr_feat = nn.Linear(_NEIGHBOUR_FEATURES, w)
        self.nbr_ctx = nn.Linear(dim, w)
        self.nbr_mlp = nn.Sequential(nn.GELU(), nn.Linear(w, w), nn.GELU(), nn.Linear(w, 2 * scales))  # S logits, S widths
        with torch.no_grad():  # the S kernels of a neighbour start at 2, 20, 200, ... km: a heavy-tailed kernel, not S equal ones
            lo, hi = (math.log(v) for v in WIDTH_RANGE_KM)
            start = torch.tensor([(math.log(2.0 * 10.0**i) - lo) / (hi - lo) for i in range(scales)])
            self.nbr_mlp[-1].bias[scales:] = torch.logit(start.clamp(0.01, 0.99))
        self.register_buffer("gallery_emb", torch.zeros(gallery_rows, embed_dim, dtype=torch.float16))
        self.register_buffer("gallery_xyz", torch.zeros(gallery_rows, 3))

    @property
    def cond_dim(self) -> int:
        return self.embed_dim + FEATURES_PER_NEIGHBOUR * self.k

    def _neighbour_features(self, sim: Tensor, valid: Tensor, support: Tensor) -> Tensor:
        """(B, k, F) features of each neighbour slot: similarity, gap to the best, rank, support."""
        k = self.k
        gap = sim.masked_fill(~valid, -1e4).amax(1, keepdim=True) - sim
        rank = torch.arange(k, device=sim.device, dtype=sim.dtype).expand_as(sim) / max(k - 1, 1)
        return torch.cat([torch.stack([sim, gap.masked_fill(~valid, 0.0), rank], dim=-1), support], dim=-1)

    def forward(self, cond: Tensor) -> HybridParams:
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"condition must have shape (B, {self.cond_dim}), got {tuple(cond.shape)}")
        b, m = len(cond), self.m
        z, block = cond[:, : self.embed_dim].float(), cond[:, self.embed_dim :].float()
        xyz, sim, valid, support = split_block(block, self.k)
        h = self.trunk(self.drop(self.inp(z)))
        g = self.global_head(h)
        g_mu = F.normalize(g[:, : 3 * m].reshape(b, m, 3), dim=-1)
        g_kappa = _width_to_kappa(g[:, 3 * m : 4 * m])
        g_logit, u_logit = g[:, 4 * m : 5 * m], g[:, 5 * m :]
        e = self.nbr_mlp(self.nbr_feat(self._neighbour_features(sim, valid, support)) + self.nbr_ctx(h)[:, None, :])
        sc = self.s  # neighbour j's S kernels are components j·S … j·S + S − 1
        n_logit = e[..., :sc].masked_fill(~valid[..., None], float("-inf")).reshape(b, -1)
        n_kappa = _width_to_kappa(e[..., sc:]).reshape(b, -1)
        n_mu = F.normalize(xyz + (~valid)[..., None] * torch.tensor([0.0, 0.0, 1.0], device=xyz.device), dim=-1)
        mu = torch.cat([n_mu.repeat_interleave(sc, dim=1), g_mu], 1)
        log_w = torch.log_softmax(torch.cat([n_logit, g_logit, u_logit], 1).double(), dim=1)
        return HybridParams(mu=mu, kappa=torch.cat([n_kappa, g_kappa], 1), log_w=log_w)

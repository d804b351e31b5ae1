"""GeoAdaLNMLP: the conditional residual MLP of every generative model, and the vMF baseline nets.

See docs/methods.md#network (generative models and vMF baselines). The network never sees ``t``; it sees
the noise level ``γ(t) ∈ [0, 1]``. Parameter counts match the reference implementation's exactly, e.g.
``GeoAdaLNMLP(NetworkConfig())`` has 36,034,563 parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from geopipe.pipeline.core.errors import ConfigError, check_int
from geopipe.pipeline.model.location import (
    DEFAULT_LOCATION_FREQUENCIES,
    DEFAULT_LOCATION_SCALES,
    LOCATION_FEATURES,
    MAX_LOCATION_FREQUENCIES,
    MAX_LOCATION_SCALES,
    RandomFourierFeatures,
)

__all__ = [
    "NetworkConfig",
    "VMFParams",
    "time_features",
    "GeoAdaLNMLP",
    "GeoAdaLNMLPVonMises",
    "count_parameters",
]

_LN_EPS = 1e-5  # LayerNorm without affine parameters, biased variance
_MAX_POSITIONS = 10000.0  # sinusoid base of the time features


@dataclass(frozen=True)
class NetworkConfig:
    """Shape of a GeoAdaLNMLP.

    input_dim: ambient coordinate dimension D (3 for R³/S², 2 for the lat/lon ablation);
    dim: width d (must be a multiple of 8 so that C = d/4 time channels split into cos/sin);
    depth: number of residual AdaLN blocks L (12 for generative models, 11 for vMF baselines);
    expansion: MLP hidden width factor; cond_dim: embedding dimension of the image condition.
    location_features: encoding of the noisy point added to its plain coordinates, ``"none"`` or
    ``"rff"`` (random Fourier features at ``location_scales`` σ, ``location_frequencies`` K per
    scale, drawn from ``location_seed``; :mod:`geopipe.pipeline.model.location`,
    docs/methods.md#location-features). With ``"none"`` the location keys are left out of
    :meth:`to_dict`, so such configs read and compare exactly as before the option existed.
    """

    input_dim: int = 3
    dim: int = 512
    depth: int = 12
    expansion: int = 4
    cond_dim: int = 1024
    location_features: str = "none"
    location_scales: tuple[float, ...] = DEFAULT_LOCATION_SCALES
    location_frequencies: int = DEFAULT_LOCATION_FREQUENCIES
    location_seed: int = 0

    def __post_init__(self) -> None:
        for name in ("input_dim", "dim", "depth", "expansion", "cond_dim"):
            check_int(getattr(self, name), name, 1, where="network config")
        if self.dim % 8:
            raise ConfigError(f"network config: dim must be a multiple of 8 (time channels d/4 split in cos/sin), got {self.dim}")
        _check_location(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (written into checkpoint config.json under "network")."""
        d = dataclasses.asdict(self)
        if self.location_features == "none":
            return {k: v for k, v in d.items() if not k.startswith("location_")}
        return {**d, "location_scales": list(self.location_scales)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NetworkConfig:
        """Inverse of :meth:`to_dict`; missing keys take defaults (``location_features`` "none"),
        unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"network config must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown network config key(s) {unknown}; valid keys are {valid}")
        d = dict(d)
        if isinstance(d.get("location_scales"), list):
            d["location_scales"] = tuple(d["location_scales"])
        return cls(**d)


def _check_location(cfg: NetworkConfig) -> None:
    if cfg.location_features not in LOCATION_FEATURES:
        raise ConfigError(f"network config: location_features must be one of {list(LOCATION_FEATURES)}, got {cfg.location_features!r}")
    check_int(cfg.location_frequencies, "location_frequencies", 1, maximum=MAX_LOCATION_FREQUENCIES, where="network config")
    check_int(cfg.location_seed, "location_seed", 0, maximum=2**63 - 1, where="network config")
    scales = cfg.location_scales
    ok = isinstance(scales, tuple) and 1 <= len(scales) <= MAX_LOCATION_SCALES and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in scales)
    if not ok:
        raise ConfigError(f"network config: location_scales must be 1 to {MAX_LOCATION_SCALES} positive finite numbers, got {scales!r}")
    object.__setattr__(cfg, "location_scales", tuple(float(v) for v in scales))


@dataclass(frozen=True)
class VMFParams:
    """Parameters of a (mixture of) von Mises–Fisher distribution(s) on S² per record.

    mu: (B, M, 3) unit mean directions; kappa: (B, M) concentrations (> 0, Softplus);
    weights: (B, M) mixture weights summing to 1 (all ones when M = 1).
    """

    mu: Tensor
    kappa: Tensor
    weights: Tensor


def time_features(gamma: Tensor, channels: int) -> Tensor:
    """Standardised sinusoidal features of the noise level (step 2 of the network).

    gamma: (B,) noise levels γ ∈ [0, 1] (any float dtype); channels: C (even, ≥ 4).
    With τ = 1000·γ and f_k = 10000^(−2k/C), k < C/2 (computed in float32 as the reference does),
    r = [cos(τ f), sin(τ f)] (cosines first) and the result is (r − mean r)/std r per sample with
    the unbiased (C − 1) std and no epsilon. Returns (B, C) in gamma's dtype; the phases τ·f are
    formed in that dtype too (float32 input reproduces the reference's float32 computation and its oracle values).
    """
    if channels < 4 or channels % 2:
        raise ValueError(f"time_features: channels must be even and >= 4, got {channels}")
    if gamma.dim() != 1:
        raise ValueError(f"time_features: gamma must have shape (B,), got {tuple(gamma.shape)}")
    half = channels // 2
    freqs = torch.arange(half, dtype=torch.float32, device=gamma.device) / half
    freqs = (1.0 / _MAX_POSITIONS) ** freqs
    arg = torch.outer(gamma * 1000.0, freqs.to(gamma.dtype))
    raw = torch.cat([arg.cos(), arg.sin()], dim=1)
    return (raw - raw.mean(dim=1, keepdim=True)) / raw.std(dim=1, keepdim=True)


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters of ``module`` (all of them unless ``trainable_only``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _layer_norm(h: Tensor) -> Tensor:
    return F.layer_norm(h, (h.shape[-1],), eps=_LN_EPS)


class _AdaLNBlock(nn.Module):
    """Pre-norm AdaLN residual block with gate (DiT style): h + g ⊙ MLP((1 + a) ⊙ LN(h) + b)."""

    def __init__(self, dim: int, expansion: int) -> None:
        super().__init__()
        self.ada = nn.Linear(dim, 3 * dim)  # chunks: scale, shift, gate (not zero-initialised)
        self.mlp = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))
        nn.init.zeros_(self.mlp[2].weight)  # zero second linear: every block is the identity at init
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: Tensor, s_act: Tensor) -> Tensor:
        scale, shift, gate = self.ada(s_act).chunk(3, dim=-1)
        return h + gate * self.mlp((1.0 + scale) * _layer_norm(h) + shift)


class _Trunk(nn.Module):
    """The L blocks plus the final AdaLN (scale, shift), both driven by SiLU(s); (B,d),(B,d) -> (B,d)."""

    def __init__(self, dim: int, depth: int, expansion: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_AdaLNBlock(dim, expansion) for _ in range(depth))
        self.final_ada = nn.Linear(dim, 2 * dim)

    def forward(self, h: Tensor, s: Tensor) -> Tensor:
        s_act = F.silu(s)
        for block in self.blocks:
            h = block(h, s_act)
        scale, shift = self.final_ada(s_act).chunk(2, dim=-1)
        return (1.0 + scale) * _layer_norm(h) + shift


def _check_cond(cond: Tensor, cond_dim: int, batch: int | None = None) -> None:
    if cond.dim() != 2 or cond.shape[1] != cond_dim or (batch is not None and cond.shape[0] != batch):
        want = f"({batch if batch is not None else 'B'}, {cond_dim})"
        raise ValueError(f"condition must have shape {want}, got {tuple(cond.shape)}")


class GeoAdaLNMLP(nn.Module):
    """ψ_θ(y, γ, c) (docs/methods.md#network): ε̂ (diffusion) or the γ-velocity (FM, RFM).

    forward(y (B, D), gamma (B,) or scalar, cond (B, cond_dim)) -> (B, D). With
    ``cfg.location_features == "rff"`` the block input is W_y y + b + W_φ φ(y), φ the fixed random
    Fourier features (``loc_features.freqs`` buffer) and W_φ (``loc_proj``, no bias) learnt.
    """

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.time_channels = d // 4
        self.in_proj = nn.Linear(cfg.input_dim, d)
        if cfg.location_features == "rff":
            self.loc_features = RandomFourierFeatures(cfg.location_scales, cfg.location_frequencies, cfg.location_seed, cfg.input_dim)
            self.loc_proj = nn.Linear(self.loc_features.out_dim, d, bias=False)
        else:
            self.loc_features = self.loc_proj = None
        self.time_mlp = nn.Sequential(nn.Linear(self.time_channels, d), nn.SiLU(), nn.Linear(d, d))
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.trunk = _Trunk(d, cfg.depth, cfg.expansion)
        self.out_proj = nn.Linear(d, cfg.input_dim)

    def forward(self, y: Tensor, gamma: Tensor, cond: Tensor) -> Tensor:
        if y.dim() != 2 or y.shape[1] != self.cfg.input_dim:
            raise ValueError(f"y must have shape (B, {self.cfg.input_dim}), got {tuple(y.shape)}")
        batch = y.shape[0]
        gamma = torch.as_tensor(gamma, dtype=y.dtype, device=y.device)
        if gamma.dim() == 0:
            gamma = gamma.expand(batch)
        if gamma.shape != (batch,):
            raise ValueError(f"gamma must have shape ({batch},) or be a scalar, got {tuple(gamma.shape)}")
        _check_cond(cond, self.cfg.cond_dim, batch)
        e_t = self.time_mlp(time_features(gamma, self.time_channels))
        s = self.cond_proj(cond) + e_t
        h = self.in_proj(y)
        if self.loc_proj is not None:
            h = h + self.loc_proj(self.loc_features(y))
        return self.out_proj(self.trunk(h, s))


def _vmf_head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Linear(dim, out))


class GeoAdaLNMLPVonMises(nn.Module):
    """vMF (components=1) or vMF-mixture (components=M>1) baseline network (docs/methods.md#network).

    A learned register r ∈ R^d (trunc-normal, std 0.02, cut at ±0.04) is the block input for every
    record; the conditioning is s = W_c c + b_c only (no time). Callers pass depth 11 for the
    paper's baselines. forward(cond (B, cond_dim)) -> :class:`VMFParams` with M = components.
    """

    def __init__(self, cfg: NetworkConfig, components: int = 1) -> None:
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ConfigError(f"components must be a positive integer (1 = vMF, 3 = paper mixture), got {components!r}")
        if cfg.input_dim != 3:
            raise ConfigError(f"vMF networks live on S² and need input_dim 3, got {cfg.input_dim}")
        if cfg.location_features != "none":
            raise ConfigError(f"location features {cfg.location_features!r} encode a denoiser's noisy point; vMF networks have "
                              "none: use --location-features none with vmf / vmf_mixture")
        self.cfg = cfg
        self.components = components
        d = cfg.dim
        self.register_token = nn.Parameter(torch.empty(d))
        nn.init.trunc_normal_(self.register_token, std=0.02, a=-0.04, b=0.04)
        self.cond_proj = nn.Linear(cfg.cond_dim, d)
        self.trunk = _Trunk(d, cfg.depth, cfg.expansion)
        self.mu_head = _vmf_head(d, 3 * components)
        self.kappa_head = _vmf_head(d, components)
        self.weight_head = _vmf_head(d, components) if components > 1 else None

    def forward(self, cond: Tensor) -> VMFParams:
        _check_cond(cond, self.cfg.cond_dim)
        batch = cond.shape[0]
        h = self.register_token.expand(batch, -1)
        h = self.trunk(h, self.cond_proj(cond))
        mu = F.normalize(self.mu_head(h).reshape(batch, self.components, 3), dim=-1)
        kappa = F.softplus(self.kappa_head(h))
        if self.weight_head is None:
            weights = torch.ones_like(kappa)
        else:
            weights = torch.softmax(self.weight_head(h), dim=-1)
        return VMFParams(mu=mu, kappa=kappa, weights=weights)

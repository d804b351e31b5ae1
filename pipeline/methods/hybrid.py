"""The hybrid method: a density conditioned on the image embedding and its retrieved neighbours
(docs/methods.md#hybrid).

p(x | c) = Σ_j w_j vMF(x; n_j, κ_j) + Σ_m w_m vMF(x; μ_m, κ_m) + w_u / 4π, where n_j are the
locations of the record's k nearest gallery rows (:mod:`geopipe.pipeline.model.neighbours`),
and the weights, the widths and the M embedding-driven components come from
:class:`~geopipe.pipeline.model.hybrid_net.HybridNet`. The log-density is exact (closed form),
so NLL, localizability, HDR ranks and regions cost no ODE; it is trained by maximum likelihood.
The point prediction is the location holding the most mass within ≈ 25, 100, 400 and 1,500 km.
"""

from __future__ import annotations

import math

import torch

from geopipe.pipeline.core.errors import ConfigError, check_int
from geopipe.pipeline.methods.base import MethodBase, finalize_points
from geopipe.pipeline.methods.hybrid_calibration import HybridCalibration
from geopipe.pipeline.model.hybrid_net import HybridParams, hybrid_log_density
from geopipe.pipeline.model.neighbours import neighbour_block, split_block
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture

__all__ = ["HybridMethod", "hybrid_log_density", "smoothed_log_score", "calibrate_params", "POINT_WIDTHS_KM"]

#: Scales of the point prediction: the candidate maximising the sum over these widths of the mass
#: within about each (on the geoclip world's validation split, one width traded median km against
#: acc@25 km and GeoScore: 25 km 96 km / 35.0 % / 3978, 200 km 89 km / 29.6 % / 4025; the four
#: together 91 km / 34.7 % / 4012).
POINT_WIDTHS_KM = (25.0, 100.0, 400.0, 1500.0)

_LOG_2PI = math.log(2.0 * math.pi)


def _log_norm(kappa: torch.Tensor) -> torch.Tensor:
    """ln C(κ) of the vMF density on S², C(κ) = κ / (4π sinh κ), stable for every κ ≥ 0 (float64)."""
    k = kappa.clamp_min(1e-12)
    return torch.log(k) - _LOG_2PI - k - torch.log(-torch.expm1(-2.0 * k))


def smoothed_log_score(candidates: torch.Tensor, p, width_km: float) -> torch.Tensor:
    """ln E_{x~p}[exp(κ_s(⟨c, x⟩ − 1))] (B, C) of candidates c (B, C, 3) under each record's mixture:
    how much of the record's mass lies within about ``width_km`` (κ_s = (R / width)²) of c. Closed
    form per vMF term, ln C(κ_j) − ln C(‖κ_j μ_j + κ_s c‖) − κ_s; the uniform's term is
    −ln 4π − ln C(κ_s) − κ_s. Unlike the density at c, a thin spike of little
    mass does not win."""
    ks = (EARTH_RADIUS_KM / width_km) ** 2
    c = torch.nn.functional.normalize(candidates.double(), dim=-1)[:, :, None, :]  # (B, C, 1, 3)
    mu = torch.nn.functional.normalize(p.mu.double(), dim=-1)[:, None, :, :]  # (B, 1, J, 3)
    k = p.kappa[:, None, :]
    # ρ² − κ² = κ_s² + 2κκ_s⟨μ, c⟩ with ⟨μ, c⟩ = 1 − ‖μ − c‖²/2: ρ − κ without cancellation at κ = 10¹¹
    gap = ks * ks + 2.0 * k * ks * (1.0 - 0.5 * ((mu - c) ** 2).sum(-1))
    rho = torch.sqrt(k * k + gap)
    log_ratio = torch.log(k / rho) + gap / (rho + k) - torch.log(-torch.expm1(-2.0 * k)) + torch.log(-torch.expm1(-2.0 * rho))
    terms = p.log_w[:, None, :-1] + log_ratio - ks  # ln w_j + ln C(κ_j) − ln C(ρ) − κ_s
    uni = p.log_w[:, None, -1:] - math.log(4.0 * math.pi) - _log_norm(torch.tensor(ks, dtype=torch.float64)) - ks
    return torch.logsumexp(torch.cat([terms, uni.expand(-1, c.shape[1], 1)], dim=2), dim=2)


def calibrate_params(p, width_scale: float = 1.0, weight_temperature: float = 1.0, floor: float = 0.0):
    """The held-out calibration of checkpoints from before :mod:`~geopipe.pipeline.methods.hybrid_calibration`:
    HybridParams with every width × ``width_scale`` (κ / scale²), log weights softened by
    ``weight_temperature`` (log_softmax(log w / T)) and a uniform ``floor`` mixed in:
    w ← (1 − floor) w, w_u ← (1 − floor) w_u + floor. Defaults: the identity."""
    if width_scale == 1.0 and weight_temperature == 1.0 and floor == 0.0:
        return p
    lw = torch.log_softmax(p.log_w / weight_temperature, dim=1) + math.log1p(-floor)
    if floor > 0:
        lw = torch.cat([lw[:, :-1], torch.logaddexp(lw[:, -1:], torch.full_like(lw[:, -1:], math.log(floor)))], dim=1)
    return HybridParams(p.mu, p.kappa / width_scale**2, lw)


def _params(model, cond: torch.Tensor):
    """The network's parameters of each row of cond, computed once per run of equal rows (the
    likelihood of n draws per record repeats each record's row n times)."""
    uniq, inv = torch.unique_consecutive(cond, dim=0, return_inverse=True)
    if len(uniq) == len(cond):
        return model(cond)
    p = model(uniq)
    return HybridParams(p.mu[inv], p.kappa[inv], p.log_w[inv])


def _no_sampler(sampler) -> None:
    if sampler is not None:
        raise ConfigError(f"method 'hybrid' draws with Wood's vMF sampler; sampler {sampler!r} does not apply (leave it unset)")


class HybridMethod(MethodBase):
    """Neighbour kernels + embedding vMF components + uniform floor; options: ``neighbours`` (k, 64),
    ``components`` (M, 3), ``scales`` (S, 3 kernels per neighbour), ``dropout`` (training's dropout on the
    embedding's projection, 0.5), ``calibration`` (the held-out calibration
    fitted by ``train --val-store``, :class:`~geopipe.pipeline.methods.hybrid_calibration.HybridCalibration`;
    none by default), ``exclude_km`` (training's near-duplicate radius, 0.1 km) and ``gallery_rows`` (set by
    training: the gallery stored in the weights). ``width_scale`` / ``weight_temperature`` / ``floor``: the
    three-number calibration of older checkpoints (:func:`calibrate_params`), read, no longer fitted."""

    name = "hybrid"
    space = "sphere"
    closed_form_density = True
    needs_gallery = True
    OPTIONS = ("neighbours", "components", "scales", "dropout", "exclude_km", "gallery_rows", "calibration", "width_scale",
               "weight_temperature", "floor")
    TRAIN_DEFAULTS = {"depth": 2, "lr": 1e-3, "grad_clip": 1.0}

    def __init__(self, *, neighbours: int = 64, components: int = 3, scales: int = 3, dropout: float = 0.5, exclude_km: float = 0.1,
                 gallery_rows: int = 0,
                 calibration: dict | HybridCalibration | None = None, width_scale: float = 1.0, weight_temperature: float = 1.0,
                 floor: float = 0.0, cond_drop: float | None = None, schedule=None, schedule_params: dict | None = None, sampler: str | None = None):
        _no_sampler(sampler)
        if cond_drop:
            raise ConfigError("method 'hybrid' has no guidance: leave --cond-drop unset")
        self.neighbours = check_int(neighbours, "neighbours", 1, maximum=1024)
        self.components = check_int(components, "components", 1, maximum=64)
        self.scales = check_int(scales, "scales", 1, maximum=8)
        self.gallery_rows = check_int(gallery_rows, "gallery_rows", 0)
        if isinstance(exclude_km, bool) or not isinstance(exclude_km, (int, float)) or not 0 <= exclude_km < 20000:
            raise ConfigError(f"--exclude-km must be a distance in [0, 20000) km, got {exclude_km!r}")
        self.exclude_km = float(exclude_km)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"hybrid --dropout must be a probability in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        for name, v, lo, hi in (("width_scale", width_scale, 0.0, math.inf), ("weight_temperature", weight_temperature, 0.0, math.inf),
                                ("floor", floor, -1e-300, 1.0)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v < hi or (name == "floor" and v == 0)):
                raise ConfigError(f"hybrid {name} must be a finite number in ({lo:g}, {hi:g}), got {v!r}")
        self.width_scale, self.weight_temperature, self.floor = float(width_scale), float(weight_temperature), float(floor)
        self.calibration = None if calibration is None else HybridCalibration.from_dict(calibration, self.scales, self.components)
        if self.calibration is not None and (self.width_scale, self.weight_temperature, self.floor) != (1.0, 1.0, 0.0):
            raise ConfigError("hybrid: give either a calibration or width_scale / weight_temperature / floor (older checkpoints), not both")
        self.cond_drop = 0.0

    def _option(self, key: str):
        if key == "calibration":
            return None if self.calibration is None else self.calibration.to_dict()
        return getattr(self, key)

    def build_model(self, net_cfg) -> torch.nn.Module:
        """HybridNet over a ``net_cfg.cond_dim``-wide embedding and the method's gallery size."""
        from geopipe.pipeline.model.hybrid_net import HybridNet

        return HybridNet(net_cfg.cond_dim, net_cfg.dim, net_cfg.depth, net_cfg.expansion, neighbours=self.neighbours,
                         components=self.components, gallery_rows=self.gallery_rows, scales=self.scales, dropout=self.dropout)

    def neighbour_block(self, model, embeddings: torch.Tensor, **exclude) -> torch.Tensor:
        """(B, F·k) neighbour block of raw embeddings (B, D) against the model's gallery (``exclude``: see
        :func:`~geopipe.pipeline.model.neighbours.neighbour_block`)."""
        if model.gallery_emb.shape[0] == 0:
            raise ConfigError("this hybrid model has an empty gallery; train it with geopipe train --method hybrid")
        return neighbour_block(embeddings, _gallery32(model), model.gallery_xyz, self.neighbours, **exclude)

    def condition(self, model, embeddings: torch.Tensor, standardized: torch.Tensor) -> torch.Tensor:
        """The network input: standardised embeddings (B, D) followed by their neighbour block."""
        with torch.no_grad():
            return torch.cat([standardized, self.neighbour_block(model, embeddings.to(standardized.device))], dim=1)

    def params(self, model, cond: torch.Tensor):
        """The records' HybridParams with the method's held-out calibration applied."""
        return self.calibrate(model, model(cond), cond)

    def mixture(self, model, cond: torch.Tensor):
        """The records' density as a vMF mixture (HybridParams; the last weight is the uniform's):
        regions draw its narrow kernels as discs (:mod:`~geopipe.pipeline.infer.mixture_regions`)."""
        return self.params(model, cond)

    def calibrate(self, model, p, cond: torch.Tensor):
        """``p`` (the network's HybridParams of rows ``cond``) under the held-out calibration, if any."""
        if self.calibration is None:
            return calibrate_params(p, self.width_scale, self.weight_temperature, self.floor)
        _, sim, valid, _ = split_block(cond[:, model.embed_dim :], self.neighbours)
        return self.calibration.apply(p, sim, valid)

    def loss(self, model, x: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean NLL in nats (scalar) of unit x (B, 3)."""
        return -hybrid_log_density(x, model(cond)).mean()  # rows differ: no _params

    @torch.no_grad()
    def predict_point(self, model, cond, *, steps: int = 16, guidance: float = 2.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """The neighbour or component mean holding the most of the record's mass within ≈ 25, 100, 400
        and 1,500 km together (``POINT_WIDTHS_KM``, :func:`smoothed_log_score`): (B, 3)."""
        _no_sampler(sampler)
        p = self.params(model, cond)
        b, ks = len(p.mu), self.neighbours * self.scales
        pick = torch.cat([torch.arange(0, ks, self.scales), torch.arange(ks, p.mu.shape[1])]).to(p.mu.device)  # one per location
        cand = p.mu[:, pick]
        score = torch.logsumexp(torch.stack([smoothed_log_score(cand, p, w) for w in POINT_WIDTHS_KM]), dim=0)
        score = score.masked_fill(torch.isinf(p.log_w[:, pick]), float("-inf"))
        best = cand[torch.arange(b, device=p.mu.device), score.argmax(1)]
        return finalize_points(best, keys)

    @torch.no_grad()
    def sample(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
               generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """n draws per record (B, n, 3): a component from the weights, then a Wood draw (κ ≈ 0: uniform)."""
        _no_sampler(sampler)
        p = self.params(model, cond)
        b = len(p.mu)
        mu = torch.cat([p.mu.double(), p.mu.new_zeros(b, 1, 3, dtype=torch.float64) + torch.tensor([0.0, 0.0, 1.0])], 1)
        kappa = torch.cat([p.kappa, p.kappa.new_full((b, 1), 1e-9)], 1)
        x = sample_vmf_mixture(mu, kappa, p.log_w.exp(), n, generator=generator).to(cond.dtype)
        return finalize_points(x.reshape(-1, 3), keys, per_record=n).reshape(b, n, 3)

    @torch.no_grad()
    def log_likelihood(self, model, x: torch.Tensor, cond: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance: float = 0.0, **ode) -> torch.Tensor:
        """Closed-form log p(x | c) (B,) nats per steradian (tolerances, solver and guidance unused)."""
        return hybrid_log_density(x, self.calibrate(model, _params(model, cond), cond))


def _gallery32(model) -> torch.Tensor:
    """The gallery's float32 copy, made once per model (the stored rows are float16)."""
    g = model.gallery_emb
    key = (g.data_ptr(), g._version, tuple(g.shape), str(g.device))  # _version: a load_state_dict copies in place
    cached = getattr(model, "_gallery32", None)
    if cached is None or cached[0] != key:
        cached = (key, g.float())
        object.__setattr__(model, "_gallery32", cached)
    return cached[1]

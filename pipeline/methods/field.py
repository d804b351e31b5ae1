"""Generative methods with a network field ψ_θ(y, γ, c): RFM on S², FM and DDPM in R³
(docs/methods.md#models).

Training draws t ~ U[0, 1) per sample, γ = γ(t) (the network's time input), and replaces the
condition by zeros with probability ``cond_drop`` (CFG dropout, docs/methods.md#guidance).
Sampling integrates the guided field on the sampler grid; every final R³ point is projected
onto S² (docs/methods.md#projection). Likelihoods are exact ODE likelihoods
(:mod:`geopipe.pipeline.model.likelihood`) in nats: per steradian for ``rfm``, per unit volume
of R³ for ``flow`` / ``diffusion`` (not comparable, docs/methods.md#units).
"""

from __future__ import annotations

import abc

import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.methods.base import MethodBase, drop_condition, finalize_points, resolve_schedule
from geopipe.pipeline.model.guidance import guided_field
from geopipe.pipeline.model.likelihood import (
    as_autograd_tensor,
    diffusion_log_likelihood,
    euclidean_log_likelihood,
    sphere_log_likelihood,
)
from geopipe.pipeline.model.samplers import get_sampler
from geopipe.pipeline.model.schedules import schedule_to_dict
from geopipe.pipeline.sphere.geometry import sphere_exp, sphere_log, uniform_sphere

__all__ = ["rfm_interpolant", "RFMMethod", "FlowMethod", "DiffusionMethod"]


def rfm_interpolant(x0: torch.Tensor, x1: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Geodesic interpolant and its γ-velocity on S² (docs/methods.md#rfm). x0 noise, x1 data (B, 3); γ (B,).

    v = log_{x0}(x1), θ = ‖v‖; x_γ = exp_{x0}(γ v); u* = −θ sin(γθ) x0 + cos(γθ) v
    (= log_{x_γ}(x1)/(1 − γ), tangent at x_γ, ‖u*‖ = θ). Returns (x_γ, u*), both (B, 3).
    """
    v = sphere_log(x0, x1)
    theta = v.norm(dim=-1, keepdim=True)
    g = gamma.unsqueeze(-1)
    y = sphere_exp(x0, g * v)
    target = -theta * torch.sin(g * theta) * x0 + torch.cos(g * theta) * v
    return y, target


class _FieldMethod(MethodBase):
    """Shared training / sampling / likelihood plumbing for the network-field methods."""

    space = "r3"
    prediction = "velocity"
    default_sampler = "euler"
    OPTIONS = ("schedule", "cond_drop", "sampler")

    def __init__(self, *, schedule="sigmoid", schedule_params: dict | None = None, cond_drop: float | None = None, sampler: str | None = None):
        self.schedule = resolve_schedule(schedule, schedule_params)
        self.cond_drop = 0.1 if cond_drop is None else float(cond_drop)
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        self.sampler = sampler or self.default_sampler
        get_sampler(self.sampler, space=self.space, prediction=self.prediction)

    def _option(self, key):
        return schedule_to_dict(self.schedule) if key == "schedule" else getattr(self, key)

    def build_model(self, net_cfg) -> torch.nn.Module:
        """A GeoAdaLNMLP ψ_θ(y (B, D), γ (B,), c (B, C)) → (B, D)."""
        from geopipe.pipeline.model.network import GeoAdaLNMLP

        return GeoAdaLNMLP(net_cfg)

    def loss(self, model, x: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-coordinate MSE between ψ_θ(y, γ, c) and the target (scalar). x (B, 3) unit, cond (B, C)."""
        cond = drop_condition(cond, self.cond_drop, generator)
        t = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
        gamma = self.schedule.gamma(t)
        y, target = self._pair(x, gamma, generator)
        out = model(y, gamma, cond)
        return ((out - target) ** 2).mean()

    @abc.abstractmethod
    def _pair(self, x: torch.Tensor, gamma: torch.Tensor, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(network input y (B, 3) at noise level γ (B,), regression target (B, 3)) for data x."""

    @abc.abstractmethod
    def _likelihood(self, field, x: torch.Tensor, **kw) -> torch.Tensor:
        """log p(x) (B,) nats of the family's ODE for a (guided) ``field``."""

    def _noise(self, n: int, like: torch.Tensor, generator) -> torch.Tensor:
        return torch.randn(n, 3, generator=generator, dtype=like.dtype, device=like.device)

    def _integrate(self, model, cond, steps, guidance, sampler, generator) -> torch.Tensor:
        spec = get_sampler(sampler or self.sampler, space=self.space, prediction=self.prediction)
        x = self._noise(cond.shape[0], cond, generator)
        return spec(guided_field(model, cond, guidance), x, self.schedule, steps)

    def predict_point(self, model, cond, *, steps: int = 16, guidance: float = 2.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """One guided sample per record: cond (B, C) → (B, 3) unit vectors."""
        return finalize_points(self._integrate(model, cond, steps, guidance, sampler, generator), keys)

    def _draw(self, model, cond, n, steps, guidance, sampler, generator, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """n sampler end points per record: (raw (B·n, 3), unit vectors (B·n, 3)); raises
        NonFiniteError naming the record."""
        x = self._integrate(model, cond.repeat_interleave(n, dim=0), steps, guidance, sampler, generator)
        return x, finalize_points(x, keys, per_record=n)

    def sample(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
               generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """n samples per record: cond (B, C) → (B, n, 3) unit vectors (one batched integration)."""
        _, unit = self._draw(model, cond, n, steps, guidance, sampler, generator, keys)
        return unit.reshape(cond.shape[0], n, 3)

    def sample_native(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """n draws per record (B, n, 3); for R³ methods the unprojected ODE/DDIM end points,
        whose R³ density is the model's: see :meth:`MethodBase.sample_native`."""
        raw, unit = self._draw(model, cond, n, steps, guidance, sampler, generator, keys)
        return (raw if self.space == "r3" else unit).reshape(cond.shape[0], n, 3)

    def log_likelihood(self, model, x: torch.Tensor, cond: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance: float = 0.0, **ode) -> torch.Tensor:
        """Exact log p(x | c) (B,) nats; extra keywords go to :mod:`geopipe.pipeline.model.likelihood`."""
        field = guided_field(model, as_autograd_tensor(cond), guidance)
        return self._likelihood(field, x.to(cond.dtype), rtol=rtol, atol=atol, **ode)


class RFMMethod(_FieldMethod):
    """Riemannian flow matching on S² (docs/methods.md#rfm), the default method; sampler ``riemann_euler``.

    Sampling starts from uniform points on S² (the reference Lightning module; its pipeline used
    an un-normalised Gaussian draw). Likelihoods are Riemannian (docs/methods.md#likelihood-spaces); pass
    ``reference_ambient=True`` to ``log_likelihood`` to reproduce the reference implementation's numbers.
    """

    name = "rfm"
    space = "sphere"
    default_sampler = "riemann_euler"

    def _pair(self, x, gamma, generator):
        x0 = uniform_sphere(x.shape[0], generator=generator, dtype=x.dtype, device=x.device)
        return rfm_interpolant(x0, x, gamma)

    def _noise(self, n, like, generator):
        return uniform_sphere(n, generator=generator, dtype=like.dtype, device=like.device)

    def _likelihood(self, field, x, **kw):
        return sphere_log_likelihood(field, x, self.schedule, **kw)


class FlowMethod(_FieldMethod):
    """Euclidean flow matching in R³: y = γx + (1−γ)ε, target x − ε; sampler ``euler``."""

    name = "flow"

    def _pair(self, x, gamma, generator):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        g = gamma.unsqueeze(-1)
        return g * x + (1 - g) * eps, x - eps

    def _likelihood(self, field, x, **kw):
        return euclidean_log_likelihood(field, x, self.schedule, **kw)


class DiffusionMethod(_FieldMethod):
    """DDPM ε-prediction in R³: y = √γ x + √(1−γ) ε, target ε; sampler ``ddim``."""

    name = "diffusion"
    prediction = "eps"
    default_sampler = "ddim"

    def _pair(self, x, gamma, generator):
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        g = gamma.unsqueeze(-1)
        return g.sqrt() * x + (1 - g).sqrt() * eps, eps

    def _likelihood(self, field, x, **kw):
        return diffusion_log_likelihood(field, x, self.schedule, **kw)

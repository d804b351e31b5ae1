"""Closed-form baselines on S²: vMF, vMF mixture (docs/methods.md#vmf) and uniform
(docs/methods.md#uniform).

Densities are in nats per steradian. ``steps`` / ``guidance`` are accepted for API uniformity
with the generative methods and have no effect here (there is no ODE and no CFG); a ``sampler``
other than None is an error, since draws always use Wood's rejection scheme.
"""

from __future__ import annotations

import abc
import math

import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.methods.base import MethodBase, drop_condition, finalize_points
from geopipe.pipeline.sphere.geometry import LOG_UNIFORM_SPHERE, uniform_sphere
from geopipe.pipeline.sphere.vmf import (
    sample_vmf_mixture,
    vmf_log_density,
    vmf_mixture_log_density,
    vmf_mixture_mode,
)

__all__ = ["VMFMethod", "VMFMixtureMethod", "UniformMethod", "UniformModel"]


def _no_sampler(name: str, sampler) -> None:
    if sampler is not None:
        raise ConfigError(f"method {name!r} draws with Wood's vMF sampler; sampler {sampler!r} does not apply (leave it unset)")


class _VMFBase(MethodBase):
    space = "sphere"
    closed_form_density = True
    components = 1
    OPTIONS = ("cond_drop",)
    TRAIN_DEFAULTS = {"depth": 11, "lr": 1e-4, "grad_clip": 0.05}  # a heads-only output layer, clipped LAMB

    def __init__(self, *, cond_drop: float | None = None, schedule=None, schedule_params: dict | None = None, sampler: str | None = None):
        # schedule/schedule_params are accepted so one set of training options fits every method;
        # a vMF head has no noise schedule, so they are not used nor recorded.
        _no_sampler(self.name, sampler)
        self.cond_drop = 0.0 if cond_drop is None else float(cond_drop)
        if not 0.0 <= self.cond_drop < 1.0:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop}")

    def build_model(self, net_cfg) -> torch.nn.Module:
        """GeoAdaLNMLPVonMises: cond (B, C) → VMFParams(mu (B, M, 3), kappa (B, M), weights (B, M))."""
        from geopipe.pipeline.model.network import GeoAdaLNMLPVonMises

        return GeoAdaLNMLPVonMises(net_cfg, components=self.components)

    @abc.abstractmethod
    def _log_density(self, x, p) -> torch.Tensor:
        """log f(x) (B,) nats/sr of unit x (B, 3) under the predicted VMFParams ``p``."""

    def loss(self, model, x: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean NLL in nats (scalar) of unit x (B, 3) under the predicted distributions."""
        return -self._log_density(x, model(drop_condition(cond, self.cond_drop, generator))).mean()

    @torch.no_grad()
    def predict_point(self, model, cond, *, steps: int = 16, guidance: float = 2.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """Mode: the mean direction; for a mixture the component mean of highest density. (B, 3)."""
        _no_sampler(self.name, sampler)
        p = model(cond)
        return finalize_points(vmf_mixture_mode(p.mu, p.kappa, p.weights), keys)

    @torch.no_grad()
    def sample(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
               generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """n Wood draws per record (a component drawn from the weights first): (B, n, 3) unit."""
        _no_sampler(self.name, sampler)
        p = model(cond)
        x = sample_vmf_mixture(p.mu, p.kappa, p.weights, n, generator=generator)
        return finalize_points(x.reshape(-1, 3), keys, per_record=n).reshape(-1, n, 3)

    @torch.no_grad()
    def log_likelihood(self, model, x: torch.Tensor, cond: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance: float = 0.0, **ode) -> torch.Tensor:
        """Closed-form log p(x | c) (B,) nats per steradian (tolerances and guidance unused: exact)."""
        p = model(cond)
        return self._log_density(x.to(p.mu.dtype), p)


class VMFMethod(_VMFBase):
    """Single von Mises–Fisher: log f = ln(κ+1e-8) − ln 4π − LS(κ) + κ⟨μ, x⟩."""

    name = "vmf"
    components = 1

    def _log_density(self, x, p):
        return vmf_log_density(x, p.mu[:, 0], p.kappa[:, 0])


class VMFMixtureMethod(_VMFBase):
    """Mixture of M = 3 vMF: log Σ_i w_i f_i(x)."""

    name = "vmf_mixture"
    components = 3

    def _log_density(self, x, p):
        return vmf_mixture_log_density(x, p.mu, p.kappa, p.weights)


class UniformModel(torch.nn.Module):
    """Parameter-free stand-in network of the uniform baseline (nothing to train or load)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return cond.new_zeros(cond.shape[0], 0)


class UniformMethod(MethodBase):
    """Uniform density 1/(4π) sr⁻¹ on S²; point predictions are uniform draws."""

    name = "uniform"
    space = "sphere"
    closed_form_density = True
    trainable = False
    OPTIONS = ()

    def __init__(self, *, cond_drop: float | None = None, schedule=None, schedule_params: dict | None = None, sampler: str | None = None):
        _no_sampler(self.name, sampler)  # the other options are meaningless here and ignored

    def build_model(self, net_cfg=None) -> torch.nn.Module:
        return UniformModel()

    def loss(self, model, x: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """NLL ln 4π nats (constant, no gradient)."""
        return torch.full((), math.log(4.0 * math.pi), dtype=x.dtype, device=x.device)

    def predict_point(self, model, cond, *, steps: int = 16, guidance: float = 2.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        _no_sampler(self.name, sampler)
        return uniform_sphere(cond.shape[0], generator=generator, dtype=cond.dtype, device=cond.device)

    def sample(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
               generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        _no_sampler(self.name, sampler)
        b = cond.shape[0]
        return uniform_sphere(b * n, generator=generator, dtype=cond.dtype, device=cond.device).reshape(b, n, 3)

    def log_likelihood(self, model, x: torch.Tensor, cond: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance: float = 0.0, **ode) -> torch.Tensor:
        """−ln 4π for every x (B, 3) → (B,) nats per steradian."""
        return torch.full(x.shape[:1], LOG_UNIFORM_SPHERE, dtype=x.dtype, device=x.device)

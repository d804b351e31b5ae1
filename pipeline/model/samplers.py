"""Deterministic samplers over a network field and a noise schedule (docs/methods.md#samplers).

Every sampler has the signature ``sampler(field, x, schedule, steps) -> x_final`` where
``field(y (B, D), γ (B,)) -> (B, D)`` is ε̂ (diffusion) or the γ-velocity dy/dγ (FM, RFM), ``x`` is
the initial noise (B, D) and the grid is t_i = 1 − i/N, γ_i = γ(t_i) (noise γ_0 = 1e-9 →
data γ_N = 1). The state keeps the dtype of ``x`` (use float32 in production). The grid and
every per-step coefficient are computed once per call in float64 and moved to the device in one
transfer; the loop itself only calls the network and does a few elementwise ops (no host syncs).
Samplers run under ``torch.no_grad`` (not ``inference_mode``, so their outputs can still be
scored by the exact likelihood, which needs autograd).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.model.guidance import Field
from geopipe.pipeline.model.schedules import Schedule, time_grid
from geopipe.pipeline.sphere.geometry import project, sphere_exp, tangent_project

__all__ = [
    "SamplerSpec",
    "SAMPLERS",
    "get_sampler",
    "ddim_step",
    "riemann_euler_step",
    "ddim_sample",
    "euler_sample",
    "heun_sample",
    "riemann_euler_sample",
    "riemann_exp_sample",
    "riemann_heun_sample",
]


def _grid(schedule: Schedule, steps: int, x: torch.Tensor):
    """γ_i (N+1,) float64 on CPU and the batched γ matrix (N+1, B) on x's device/dtype."""
    _, gamma = time_grid(schedule, steps)
    gb = gamma[:, None].expand(steps + 1, x.shape[0]).to(device=x.device, dtype=x.dtype).contiguous()
    return gamma, gb


def _on(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------- single steps


def ddim_step(x: torch.Tensor, eps: torch.Tensor, gamma_now, gamma_next) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM (η = 0) step. Returns (x_next, x̂_0), both (B, D).

    x̂_0 = clip((x − √(1−γ) ε̂)/√γ, −1, 1); ε̃ = (x − √γ x̂_0)/√(1−γ);
    x_next = √γ_next x̂_0 + √(1−γ_next) ε̃.
    """
    g, gn = (torch.as_tensor(v, dtype=torch.float64) for v in (gamma_now, gamma_next))
    coef = _on(x, torch.stack((g.sqrt(), (1 - g).sqrt(), gn.sqrt(), (1 - gn).sqrt())))
    return _ddim_update(x, eps, *coef)


def _ddim_update(x, eps, a, b, a_next, b_next):
    x0 = ((x - b * eps) / a).clamp(-1.0, 1.0)
    eps_t = (x - a * x0) / b
    return a_next * x0 + b_next * eps_t, x0


def riemann_euler_step(x: torch.Tensor, v: torch.Tensor, dgamma) -> torch.Tensor:
    """Retraction step on S²: proj(x + Δγ v̂). v̂ is used unprojected, as in the reference."""
    return project(x + dgamma * v)


# ----------------------------------------------------------------------------- loops


@torch.no_grad()
def ddim_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """DDIM η = 0 for ε-prediction models; the last step returns x̂_0 of its evaluation."""
    gamma, gb = _grid(schedule, steps, x)
    a, b = _on(x, gamma.sqrt()), _on(x, (1 - gamma).sqrt())
    for i in range(steps):
        eps = field(x, gb[i])
        x_next, x0 = _ddim_update(x, eps, a[i], b[i], a[i + 1], b[i + 1])
        x = x0 if i == steps - 1 else x_next
    return x


@torch.no_grad()
def euler_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """Euler in R^D: x_{i+1} = x_i + (γ_{i+1} − γ_i) v̂(x_i, γ_i). No projection."""
    gamma, gb = _grid(schedule, steps, x)
    h = _on(x, gamma.diff())
    for i in range(steps):
        x = x + h[i] * field(x, gb[i])
    return x


@torch.no_grad()
def heun_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """Heun (explicit trapezoid, 2nd order) in R^D; 2 field evaluations per step, also at γ_N = 1."""
    gamma, gb = _grid(schedule, steps, x)
    h = _on(x, gamma.diff())
    half = h / 2
    for i in range(steps):
        v1 = field(x, gb[i])
        v2 = field(x + h[i] * v1, gb[i + 1])
        x = x + half[i] * (v1 + v2)
    return x


@torch.no_grad()
def riemann_euler_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """Riemannian Euler with re-projection (default for rfm): x ← proj(x + Δγ v̂)."""
    gamma, gb = _grid(schedule, steps, x)
    h = _on(x, gamma.diff())
    for i in range(steps):
        x = project(x + h[i] * field(x, gb[i]))
    return x


@torch.no_grad()
def riemann_exp_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """Exponential-map Euler on S²: x ← exp_x(Δγ · P_x v̂) (first order, geodesic steps)."""
    gamma, gb = _grid(schedule, steps, x)
    h = _on(x, gamma.diff())
    x = project(x)
    for i in range(steps):
        x = sphere_exp(x, h[i] * tangent_project(x, field(x, gb[i])))
    return x


@torch.no_grad()
def riemann_heun_sample(field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
    """2nd-order Heun on S² for the tangent field P_x v̂, with re-projection after each stage.

    v1 = P_x v̂(x, γ_i); x̃ = proj(x + h v1); v2 = P_x̃ v̂(x̃, γ_{i+1}); x ← proj(x + h/2 (v1 + v2)).
    This is ambient Heun for the 0-homogeneous extension of P_x v̂, whose flow preserves ‖x‖, so
    the projections only move the iterate by the local error (order 2 is kept). 2 evals per step.
    """
    gamma, gb = _grid(schedule, steps, x)
    h = _on(x, gamma.diff())
    half = h / 2
    x = project(x)
    for i in range(steps):
        v1 = tangent_project(x, field(x, gb[i]))
        xp = project(x + h[i] * v1)
        v2 = tangent_project(xp, field(xp, gb[i + 1]))
        x = project(x + half[i] * (v1 + v2))
    return x


# ----------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: ``space`` "r3" | "sphere"; ``prediction`` "eps" | "velocity"."""

    name: str
    space: str
    prediction: str
    evals_per_step: int
    fn: Callable[[Field, torch.Tensor, Schedule, int], torch.Tensor]

    def __call__(self, field: Field, x: torch.Tensor, schedule: Schedule, steps: int) -> torch.Tensor:
        if steps < 1:
            raise ConfigError(f"sampler {self.name!r}: steps must be ≥ 1, got {steps}")
        return self.fn(field, x, schedule, int(steps))


SAMPLERS: dict[str, SamplerSpec] = {
    s.name: s
    for s in (
        SamplerSpec("ddim", "r3", "eps", 1, ddim_sample),
        SamplerSpec("euler", "r3", "velocity", 1, euler_sample),
        SamplerSpec("heun", "r3", "velocity", 2, heun_sample),
        SamplerSpec("riemann_euler", "sphere", "velocity", 1, riemann_euler_sample),
        SamplerSpec("riemann_exp", "sphere", "velocity", 1, riemann_exp_sample),
        SamplerSpec("riemann_heun", "sphere", "velocity", 2, riemann_heun_sample),
    )
}


def get_sampler(name: str, *, space: str | None = None, prediction: str | None = None) -> SamplerSpec:
    """Look a sampler up and check it fits the model (space "r3"/"sphere", prediction "eps"/"velocity")."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    spec = SAMPLERS[name]
    if (space is not None and spec.space != space) or (prediction is not None and spec.prediction != prediction):
        fits = sorted(
            n for n, s in SAMPLERS.items()
            if (space is None or s.space == space) and (prediction is None or s.prediction == prediction)
        )
        raise ConfigError(
            f"sampler {name!r} is for {spec.space} {spec.prediction}-prediction models, not "
            f"{space or spec.space} {prediction or spec.prediction}-prediction; choose one of {fits}"
        )
    return spec

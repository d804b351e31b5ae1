"""Noise schedules γ(t) on scheduler time t ∈ [0, 1] (docs/methods.md#schedules).

t = 0 is the data end (γ = 1), t = 1 the noise end (γ = 1e-9). Networks receive γ(t), and
flow-matching velocities are derivatives with respect to γ, so the ODE field in scheduler
time is γ'(t)·ψ. ``dgamma`` is analytic (it ignores the clamp), as in the reference.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Protocol

import torch

from geopipe.pipeline.core.errors import ConfigError

__all__ = [
    "Schedule",
    "SigmoidSchedule",
    "LinearSchedule",
    "CosineSchedule",
    "CosineSimpleSchedule",
    "SCHEDULES",
    "make_schedule",
    "schedule_to_dict",
    "schedule_from_dict",
    "time_grid",
]

_CLIP_MIN = 1e-9


class Schedule(Protocol):
    """A decreasing map γ: [0, 1] → [1e-9, 1] with its analytic derivative."""

    name: str

    def gamma(self, t: torch.Tensor) -> torch.Tensor: ...

    def dgamma(self, t: torch.Tensor) -> torch.Tensor: ...

    def alpha(self, t: torch.Tensor) -> torch.Tensor: ...


class _Base:
    name = "base"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """α(t) = −γ'(t) / (γ(t) + 1e-6) (used by the reference diffusion likelihood)."""
        return -self.dgamma(t) / (self.gamma(t) + 1e-6)


@dataclass(frozen=True)
class SigmoidSchedule(_Base):
    """Skewed sigmoid; the paper's default is start −7, end 3, τ 1."""

    start: float = -7.0
    end: float = 3.0
    tau: float = 1.0
    name = "sigmoid"

    def _parts(self, t):
        v_s = 1.0 / (1.0 + math.exp(-self.start / self.tau))
        v_e = 1.0 / (1.0 + math.exp(-self.end / self.tau))
        sig = torch.sigmoid((t * (self.end - self.start) + self.start) / self.tau)
        return v_s, v_e, sig

    def gamma(self, t):
        v_s, v_e, sig = self._parts(t)
        return ((v_e - sig) / (v_e - v_s)).clamp(_CLIP_MIN, 1.0)

    def dgamma(self, t):
        v_s, v_e, sig = self._parts(t)
        return -((self.end - self.start) / self.tau) * sig * (1 - sig) / (v_e - v_s)


@dataclass(frozen=True)
class LinearSchedule(_Base):
    """γ(t) = clip((end − start) t + start); the default is 1 − t."""

    start: float = 1.0
    end: float = 0.0
    name = "linear"

    def gamma(self, t):
        return ((self.end - self.start) * t + self.start).clamp(_CLIP_MIN, 1.0)

    def dgamma(self, t):
        return torch.full_like(t, self.end - self.start)


@dataclass(frozen=True)
class CosineSchedule(_Base):
    """γ(t) = (cos(w)^{2τ} − v_e)/(v_s − v_e), w = π/2·(t(end − start) + start).

    The derivative is the correct one (the reference implementation has an extra cos factor).
    """

    start: float = 1.0
    end: float = 0.0
    tau: float = 1.0
    name = "cosine"

    def _v(self):
        v_s = math.cos(math.pi / 2 * self.start) ** (2 * self.tau)
        v_e = math.cos(math.pi / 2 * self.end) ** (2 * self.tau)
        return v_s, v_e

    def gamma(self, t):
        v_s, v_e = self._v()
        w = math.pi / 2 * (t * (self.end - self.start) + self.start)
        return ((w.cos() ** (2 * self.tau) - v_e) / (v_s - v_e)).clamp(_CLIP_MIN, 1.0)

    def dgamma(self, t):
        v_s, v_e = self._v()
        w = math.pi / 2 * (t * (self.end - self.start) + self.start)
        dw = math.pi / 2 * (self.end - self.start)
        d = 2 * self.tau * w.cos().abs() ** (2 * self.tau - 1) * torch.sign(w.cos()) * (-w.sin()) * dw
        return d / (v_s - v_e)


@dataclass(frozen=True)
class CosineSimpleSchedule(_Base):
    """γ(t) = cos²(π/2 · (t + 2e-4)/(1 + 2.5e-4)), unclamped."""

    name = "cosine_simple"

    def gamma(self, t):
        return torch.cos(math.pi / 2 * (t + 2e-4) / (1 + 2.5e-4)) ** 2

    def dgamma(self, t):
        a = math.pi / 2 * (t + 2e-4) / (1 + 2.5e-4)
        return -math.pi * a.cos() * a.sin() / (1 + 2.5e-4)


SCHEDULES: dict[str, type] = {
    "sigmoid": SigmoidSchedule,
    "linear": LinearSchedule,
    "cosine": CosineSchedule,
    "cosine_simple": CosineSimpleSchedule,
}


def make_schedule(name: str, **params) -> Schedule:
    """Build a schedule by registry name; unknown names or parameters raise ValueError."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {unknown} for schedule {name!r}; valid: {sorted(valid)}")
    return cls(**{k: float(v) for k, v in params.items()})


def schedule_to_dict(schedule: Schedule) -> dict:
    """JSON form {"name": ..., **params} written into checkpoints."""
    return {"name": schedule.name, **asdict(schedule)}


def schedule_from_dict(d: dict) -> Schedule:
    """Inverse of :func:`schedule_to_dict`."""
    params = dict(d)
    return make_schedule(params.pop("name"), **params)


def time_grid(schedule: Schedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid (docs/methods.md#samplers): t_i = 1 − i/N, γ_i = γ(t_i), i = 0…N, float64.

    γ_0 = 1e-9 is the noise end, γ_N = 1 the data end.
    """
    if steps < 1:
        raise ConfigError(f"steps must be ≥ 1, got {steps}")
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return t, schedule.gamma(t)

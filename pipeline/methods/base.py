"""Shared pieces of the training objectives / methods (docs/methods.md#models).

Not a public entry point: use :mod:`geopipe.pipeline.methods.registry` (the METHODS registry).
"""

from __future__ import annotations

import abc

import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.model.schedules import Schedule, make_schedule, schedule_from_dict
from geopipe.pipeline.sphere.geometry import NON_FINITE_ADVICE, NonFiniteError, project

__all__ = ["MethodBase", "drop_condition", "finalize_points", "resolve_schedule"]


def drop_condition(cond: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Classifier-free-guidance dropout: each row of cond (B, C) → zeros with probability p."""
    if p <= 0.0:
        return cond
    keep = torch.rand(cond.shape[0], generator=generator, device=cond.device) >= p
    return cond * keep.unsqueeze(-1).to(cond.dtype)


def finalize_points(x: torch.Tensor, keys=None, *, per_record: int = 1) -> torch.Tensor:
    """Final points (K, 3) → unit vectors (docs/methods.md#projection), raising NonFiniteError naming the record.

    Rows are ``per_record`` consecutive samples of one record; ``keys`` (optional, one per
    record) name it in the error. The max-abs rescaling first keeps huge but finite outputs
    (e.g. 1e30 in float32, whose plain norm overflows) projectable.
    """
    scale = x.abs().amax(dim=-1, keepdim=True)
    bad = ~(torch.isfinite(x).all(dim=-1) & (scale[..., 0] > 0))
    if bool(bad.any()):
        idx = int(bad.nonzero()[0, 0])
        rec, j = divmod(idx, per_record)
        name = repr(keys[rec]) if keys is not None else f"#{rec}"
        extra = f" (sample {j})" if per_record > 1 else ""
        raise NonFiniteError(f"non-finite or zero model output for record {name}{extra}: {x[idx].tolist()}" + NON_FINITE_ADVICE)
    return project(x / scale)


def resolve_schedule(schedule, schedule_params: dict | None) -> Schedule:
    """A Schedule from an instance, a registry name (+ params) or a ``schedule_to_dict`` dict."""
    params = dict(schedule_params or {})
    if isinstance(schedule, str):
        return make_schedule(schedule, **params)
    if isinstance(schedule, dict):
        return schedule_from_dict({**schedule, **params})
    if params:
        raise ConfigError("schedule_params only apply when schedule is given by name")
    if not (hasattr(schedule, "gamma") and hasattr(schedule, "dgamma")):
        raise ConfigError(f"schedule must be a name, a dict or a Schedule, got {type(schedule).__name__}")
    return schedule


class MethodBase(abc.ABC):
    """Common surface of every method: ``name``, ``space`` ("sphere" | "r3"), ``trainable``, and
    the abstract interface below (the Method API of :mod:`geopipe.pipeline.methods.registry`):
    a family that lacks one of them cannot be instantiated.

    Subclasses set ``OPTIONS`` (constructor options recorded by :meth:`to_dict`).
    """

    name = "base"
    space = "sphere"
    trainable = True
    #: log_likelihood is a closed form (cheap: vMF family, uniform) rather than an ODE solve
    closed_form_density = False
    OPTIONS: tuple[str, ...] = ()
    # Training defaults of the family, used where the user gives none: network depth, peak
    # learning rate and gradient-norm clip (None: no clipping). See docs/methods.md, "Training".
    TRAIN_DEFAULTS = {"depth": 12, "lr": 8e-4, "grad_clip": None}

    @abc.abstractmethod
    def build_model(self, net_cfg) -> torch.nn.Module:
        """The method's network for a :class:`geopipe.pipeline.model.network.NetworkConfig`."""

    @abc.abstractmethod
    def loss(self, model, x: torch.Tensor, cond: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training objective (scalar) for unit x (B, 3) and conditioning cond (B, C)."""

    @abc.abstractmethod
    def predict_point(self, model, cond, *, steps: int = 16, guidance: float = 2.0, sampler: str | None = None,
                      generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """One point per record: cond (B, C) → (B, 3) unit vectors."""

    @abc.abstractmethod
    def sample(self, model, cond, n: int, *, steps: int = 16, guidance: float = 0.0, sampler: str | None = None,
               generator: torch.Generator | None = None, keys=None) -> torch.Tensor:
        """n draws per record: cond (B, C) → (B, n, 3) unit vectors."""

    @abc.abstractmethod
    def log_likelihood(self, model, x: torch.Tensor, cond: torch.Tensor, *, rtol: float = 1e-5, atol: float = 1e-5,
                       guidance: float = 0.0, **ode) -> torch.Tensor:
        """log p(x | c) (B,) in nats (per steradian on S², per unit volume in R³). ``ode``: solver
        keywords of the ODE likelihoods (``method="bosh3"``, …; closed forms ignore them)."""

    #: the method conditions on retrieved neighbours of a gallery stored in its weights (hybrid)
    needs_gallery = False

    def condition(self, model, embeddings: torch.Tensor, standardized: torch.Tensor) -> torch.Tensor:
        """The network's conditioning input from raw embeddings (B, D) and their z-scores (B, D):
        the z-scores themselves here; the hybrid method appends the retrieved neighbours."""
        return standardized

    def to_dict(self) -> dict:
        """JSON-able description for the checkpoint: {"name", "space", **options}."""
        return {"name": self.name, "space": self.space, **{k: self._option(k) for k in self.OPTIONS}}

    def _option(self, key: str):
        return getattr(self, key)

    def sample_native(self, model, cond, n: int, **kw) -> torch.Tensor:
        """n draws per record (B, n, 3) in the space where the density lives: unit vectors for
        sphere methods (this default: :meth:`sample`), unprojected R³ points for Euclidean ones.
        Entropy and HDR ranks need these: a projected R³ draw is not distributed as p."""
        return self.sample(model, cond, n, **kw)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={self._option(k)!r}" for k in self.OPTIONS)
        return f"{type(self).__name__}({opts})"

"""The METHODS registry: every geolocation model family behind one interface (Method API).

Each method object has ``name``, ``space`` ("sphere" | "r3"), ``trainable`` and

* ``build_model(net_cfg) -> nn.Module``
* ``loss(model, x (B, 3) unit, cond (B, C), *, generator) -> scalar`` (docs/methods.md#models)
* ``predict_point(model, cond, *, steps=16, guidance=2.0, sampler=None, generator, keys=None) -> (B, 3)``
* ``sample(model, cond, n, *, steps=16, guidance=0.0, sampler=None, generator, keys=None) -> (B, n, 3)``
* ``log_likelihood(model, x (B, 3), cond, *, rtol=1e-5, atol=1e-5, guidance=0.0, ...) -> (B,)`` nats
* ``to_dict()`` (checkpoint JSON) and :func:`method_from_dict` (its inverse).

A family may add options of its own (its ``OPTIONS``; ``hybrid``: neighbours, components,
exclude_km, gallery_rows). Options (all methods accept them; the closed-form baselines ignore the schedule):
``schedule`` (name, ``schedule_to_dict`` dict or Schedule; default skewed sigmoid −7, 3, 1),
``schedule_params`` (dict, with a schedule name), ``cond_drop`` (None = method default: 0.1 for
generative methods, 0.0 for vMF baselines), ``sampler`` (None = method default).
Outputs are unit vectors; a non-finite output raises :class:`geopipe.pipeline.sphere.geometry.NonFiniteError`.
"""

from __future__ import annotations

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.methods.base import MethodBase
from geopipe.pipeline.methods.closed_form import UniformMethod, VMFMethod, VMFMixtureMethod
from geopipe.pipeline.methods.field import DiffusionMethod, FlowMethod, RFMMethod, rfm_interpolant
from geopipe.pipeline.methods.hybrid import HybridMethod

__all__ = [
    "METHODS",
    "get_method",
    "method_from_dict",
    "rfm_interpolant",
    "RFMMethod",
    "FlowMethod",
    "DiffusionMethod",
    "VMFMethod",
    "VMFMixtureMethod",
    "UniformMethod",
    "HybridMethod",
]

METHODS: dict[str, type] = {
    "rfm": RFMMethod,
    "flow": FlowMethod,
    "diffusion": DiffusionMethod,
    "vmf": VMFMethod,
    "vmf_mixture": VMFMixtureMethod,
    "uniform": UniformMethod,
    "hybrid": HybridMethod,
}

_OPTIONS = ("schedule", "schedule_params", "cond_drop", "sampler")


def get_method(name: str, **options) -> MethodBase:
    """Build a method by registry name; unknown names or options raise ValueError listing valid ones."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    valid = (*_OPTIONS, *(o for o in METHODS[name].OPTIONS if o not in _OPTIONS))  # + the family's own (hybrid: neighbours, ...)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {name!r}; valid: {list(valid)}")
    options = {k: v for k, v in options.items() if v is not None}
    return METHODS[name](**options)


def method_from_dict(d: dict) -> MethodBase:
    """Inverse of ``method.to_dict()`` (checkpoint JSON → method)."""
    if not isinstance(d, dict) or "name" not in d:
        raise ConfigError(f"method config must be a dict with a 'name', got {d!r}")
    opts = dict(d)
    name, space = opts.pop("name"), opts.pop("space", None)
    method = get_method(name, **opts)
    if space is not None and space != method.space:
        raise ConfigError(f"method config says space {space!r} but {name!r} lives in {method.space!r}")
    return method

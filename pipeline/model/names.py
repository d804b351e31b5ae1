"""Registry names of schedules and samplers, importable without torch (for ``--help`` choices).

The registries themselves (:data:`geopipe.pipeline.model.schedules.SCHEDULES`,
:data:`geopipe.pipeline.model.samplers.SAMPLERS`) hold the implementations; a test keeps these
tuples equal to their keys.
"""

from __future__ import annotations

__all__ = ["SCHEDULE_NAMES", "SAMPLER_NAMES"]

#: Noise schedules of the diffusion-style methods (log-SNR curves).
SCHEDULE_NAMES: tuple[str, ...] = ("sigmoid", "linear", "cosine", "cosine_simple")
#: ODE samplers: R³ (ddim, euler, heun) and on the sphere (riemann_*).
SAMPLER_NAMES: tuple[str, ...] = ("ddim", "euler", "heun", "riemann_euler", "riemann_exp", "riemann_heun")

"""Registry names of the methods, importable without torch (for ``--help`` choices).

The registry itself is :data:`geopipe.pipeline.methods.registry.METHODS`; a test keeps this
tuple equal to its keys.
"""

from __future__ import annotations

__all__ = ["METHOD_NAMES"]

#: Generative methods (rfm, flow, diffusion), the hybrid (neighbour kernels + vMF) and baselines (vmf, vmf_mixture, uniform).
METHOD_NAMES: tuple[str, ...] = ("rfm", "flow", "diffusion", "vmf", "vmf_mixture", "uniform", "hybrid")

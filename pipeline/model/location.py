"""Multi-scale location features of the denoisers' noisy point (docs/methods.md#location-features).

Random Fourier features (Tancik et al. 2020; GeoCLIP's location encoder uses them at three scales)
applied directly to the ambient coordinates y ∈ R³ of the noisy point (on S² for RFM, anywhere in
R³ for flow / diffusion): for each scale σ_s, K frequencies b ~ N(0, σ_s² I₃) drawn once from the
recorded seed, and

    φ(y) = [cos(2π y·b), sin(2π y·b)] over all S·K frequencies (cosines first), (B, 2SK).

The features are a fixed, differentiable function of y, so the exact ODE divergence (autograd
through the network, :mod:`geopipe.pipeline.model.likelihood`) includes them. The Gaussian kernel
they approximate, exp(−2π²σ²‖Δy‖²), has length scale 1/(2πσ) on the unit sphere, i.e.
R⊕/(2πσ) ≈ 1,014 km / σ: the default scales σ = 1, 8, 64 resolve about 1,000, 130 and 16 km.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "LOCATION_FEATURES",
    "DEFAULT_LOCATION_SCALES",
    "DEFAULT_LOCATION_FREQUENCIES",
    "MAX_LOCATION_FREQUENCIES",
    "MAX_LOCATION_SCALES",
    "rff_frequencies",
    "RandomFourierFeatures",
]

#: Encodings of the noisy point: ``none`` (the plain coordinates only, as before), ``rff``.
LOCATION_FEATURES = ("none", "rff")
#: σ per scale (unit-sphere coordinates): length scales ≈ 1,014 km / σ = 1,014, 127, 16 km.
DEFAULT_LOCATION_SCALES = (1.0, 8.0, 64.0)
#: Frequencies K per scale (2K features per scale).
DEFAULT_LOCATION_FREQUENCIES = 64
#: Bounds a (possibly edited) checkpoint config may declare before anything is allocated.
MAX_LOCATION_FREQUENCIES = 4096
MAX_LOCATION_SCALES = 16


def rff_frequencies(scales: tuple[float, ...], count: int, seed: int, dim: int = 3) -> Tensor:
    """The fixed frequency matrix (S·K, dim) float32: rows [s·K, (s+1)·K) ~ N(0, σ_s² I).

    Drawn on the CPU from a generator seeded with ``seed`` alone, so the same (scales, count,
    seed) give the same matrix on every machine, device context and call.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    base = torch.randn(len(scales), count, dim, generator=g, dtype=torch.float32, device="cpu")
    sigma = torch.tensor(scales, dtype=torch.float32, device="cpu").view(-1, 1, 1)
    return (base * sigma).reshape(len(scales) * count, dim)


class RandomFourierFeatures(nn.Module):
    """φ(y) = [cos(2π y Bᵀ), sin(2π y Bᵀ)]: y (B, D) → (B, 2·S·K) in y's dtype.

    ``freqs`` (S·K, D) is a persistent buffer (saved with the weights, never trained; cast with
    the module's dtype) regenerated from (scales, count, seed) at construction.
    """

    def __init__(self, scales: tuple[float, ...], count: int, seed: int, dim: int = 3) -> None:
        super().__init__()
        self.register_buffer("freqs", rff_frequencies(tuple(scales), count, seed, dim))

    @property
    def out_dim(self) -> int:
        return 2 * self.freqs.shape[0]

    def forward(self, y: Tensor) -> Tensor:
        arg = (2.0 * math.pi) * (y @ self.freqs.to(y.dtype).T)
        return torch.cat((arg.cos(), arg.sin()), dim=-1)

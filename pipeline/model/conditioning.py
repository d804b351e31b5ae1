"""Standardisation of the conditioning embeddings (per-dimension z-scores).

Frozen-backbone embeddings share a large common direction (for the demo's random ViT the
mean vector has norm 0.96 of the unit-norm embeddings, per-dimension std ≈ 0.03), which
leaves the denoiser a tiny conditioning signal. Training therefore standardises each
dimension with the training split's mean and std, the statistics travel in the checkpoint
config, and prediction applies the same map. Conditioning dropout happens after the map, so
the guidance "null" embedding (zeros) is the training mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CondStats"]


@dataclass(frozen=True)
class CondStats:
    """Per-dimension mean and std (D,) float64; ``apply`` maps (B, D) embeddings to z-scores."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def identity(cls, dim: int) -> CondStats:
        return cls(np.zeros(dim), np.ones(dim))

    @classmethod
    def from_embeddings(cls, embeddings, chunk: int = 65536, min_std: float = 1e-6) -> CondStats:
        """Streaming float64 statistics over (N, D) rows (array-like, sliceable; float16 fine)."""
        n, d = embeddings.shape
        s, ss = np.zeros(d), np.zeros(d)
        for i in range(0, n, chunk):
            block = np.asarray(embeddings[i : i + chunk], dtype=np.float64)
            s += block.sum(0)
            ss += (block * block).sum(0)
        return cls.from_moments(n, s, ss, min_std=min_std)

    @classmethod
    def from_moments(cls, n: int, s: np.ndarray, ss: np.ndarray, min_std: float = 1e-6) -> CondStats:
        """Statistics from the row count and (D,) float64 sum and sum of squares of the rows."""
        mean = np.asarray(s, dtype=np.float64) / max(n, 1)
        std = np.sqrt(np.maximum(np.asarray(ss, dtype=np.float64) / max(n, 1) - mean * mean, 0.0))
        return cls(mean, np.maximum(std, min_std))

    def apply(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, D) embeddings → (B, D) float32 z-scores on ``cond``'s device."""
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=cond.device)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=cond.device)
        return (cond.float() - mean) / std

    def to_dict(self) -> dict:
        return {"mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    @classmethod
    def from_dict(cls, d: dict | None, dim: int) -> CondStats:
        """Inverse of :meth:`to_dict`; ``None`` (older checkpoints) is the identity map."""
        if d is None:
            return cls.identity(dim)
        mean, std = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["std"], dtype=np.float64)
        if mean.shape != (dim,) or std.shape != (dim,) or (std <= 0).any():
            raise ValueError(f"conditioning statistics must be two ({dim},) vectors with positive std")
        return cls(mean, std)

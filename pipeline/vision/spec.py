"""What a backbone is: its spec, the loaded frozen model, the errors, and the identity helpers.

Shared by the open_clip loaders (:mod:`geopipe.pipeline.vision.backbones`) and the foreign vision
towers (:mod:`geopipe.pipeline.vision.towers`); imports neither.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TINY_SEED", "RANDOM", "PRECISIONS", "BackboneSpec", "Backbone", "BackboneLoadError", "UnknownBackboneError",
           "one_line", "sha256_file", "sha256_state_dict", "jsonable", "load_error"]

#: Seed of the tiny backbone's random initialisation (changing it changes every tiny embedding).
TINY_SEED = 20240601

#: ``pretrained`` value asking for an open_clip architecture with seeded random weights.
RANDOM = "random"
#: ``Backbone.encode`` precisions: auto = bf16/fp16 autocast on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}

class UnknownBackboneError(ValueError):
    """A backbone name or pretrained tag that is not known; the message lists close names."""


class BackboneLoadError(RuntimeError):
    """Weights could not be fetched or loaded (offline, missing cache, incompatible checkpoint)."""


@dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to load.

    name: ``"tiny"``, an open_clip architecture name, or ``"hf-hub:org/repo"``.
    pretrained: open_clip tag or local checkpoint file (ignored forms are rejected: must be
        None for ``hf-hub:`` ids; None or a file for ``"tiny"``; required otherwise).
    image_size: override of the model's input size in pixels (None = the model's own).
    """

    name: str
    pretrained: str | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"backbone name must be a non-empty string, got {self.name!r}")
        if self.pretrained is not None and (not isinstance(self.pretrained, str) or not self.pretrained):
            raise ValueError(f"backbone pretrained must be None or a non-empty string, got {self.pretrained!r}")
        size = self.image_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"backbone image_size must be a positive int or None, got {size!r}")


@dataclass(frozen=True)
class Backbone:
    """A loaded, frozen backbone.

    model: open_clip model in eval mode with ``requires_grad=False`` everywhere.
    preprocess: PIL.Image → float Tensor (3, H, W) (open_clip's eval transform: resize,
        centre crop, to tensor, mean/std normalisation).
    embed_dim: D, the width of :meth:`encode`'s output.
    identity: JSON-able ``{"name", "pretrained", "embed_dim", "preprocess", "fingerprint"}``;
        equal identities mean equal embeddings for equal inputs.
    """

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    embed_dim: int
    identity: dict

    @property
    def device(self) -> torch.device:
        """Device holding the model's parameters."""
        return next(self.model.parameters()).device

    def encode(self, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
        """Embed a batch: (B, 3, H, W) float preprocessed images → (B, D) float32 on the model's device.

        Runs under ``torch.no_grad``. precision (:data:`PRECISIONS`): "auto" = autocast in
        bfloat16 on CUDA (float16 where bf16 is unsupported) and float32 on CPU; "fp32" = no
        autocast; "bf16"/"fp16" = autocast in that dtype. Embeddings are not normalised.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"encode expects a (B, 3, H, W) tensor of preprocessed images, got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"encode expects float images from Backbone.preprocess, got dtype {images.dtype}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        device = self.device
        if precision == "auto":
            cuda = device.type == "cuda"
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        x = images.to(device=device, dtype=torch.float32, non_blocking=True)
        with torch.no_grad():
            if precision == "fp32":
                z = self.model.encode_image(x)
            else:
                with torch.autocast(device_type=device.type, dtype=_AMP[precision]):
                    z = self.model.encode_image(x)
        return z.float()


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_state_dict(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every state-dict entry in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def load_error(spec: BackboneSpec, exc: BaseException) -> BackboneLoadError:
    what = f"backbone {spec.name!r}" + (f" (pretrained={spec.pretrained!r})" if spec.pretrained else "")
    hint = ("pass a local checkpoint file as pretrained=..., or make the weights available in the "
            "Hugging Face cache (HF_HOME) / ~/.cache/clip before running offline")
    if spec.pretrained and os.path.isfile(spec.pretrained):
        hint = "check that the checkpoint file matches the architecture"
    return BackboneLoadError(f"could not load {what}: {one_line(exc)}; {hint}")

"""Frozen image backbones (open_clip) that turn preprocessed images into embeddings.

A :class:`BackboneSpec` names a backbone; :func:`load_backbone` turns it into a
:class:`Backbone` (eval-mode frozen model + eval preprocessing + JSON identity). Names:

* ``"tiny"`` — a real open_clip CLIP model (config ``pipeline/ingest/geopipe-tiny.json``:
  ViT 64 px, patch 8, width 64, 2 layers, 2 heads, embed_dim 64; ≈0.2M parameters) with
  random weights drawn under the fixed seed :data:`TINY_SEED`, so every process gets the same
  weights. ``pretrained`` may instead be a local checkpoint file of that architecture.
* any open_clip architecture (``"ViT-L-14"``, ``"ViT-B-32"``, …) with ``pretrained`` = an
  open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, …), a local checkpoint file path, or
  :data:`RANDOM` (``"random"``: seeded random weights, for benchmarks and offline tests);
* ``"hf-hub:org/repo"`` — an open_clip model published on the Hugging Face Hub;
* ``"dinov2-vitl14-reg"`` and ``"streetclip"`` — the towers of the published PLONK models
  (timm / transformers, :mod:`geopipe.pipeline.ingest.vision_towers`).

Embeddings are ``model.encode_image`` outputs (projected, **not** L2-normalised), float32.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geopipe.pipeline.ingest.vision_towers import VISION_TOWERS

__all__ = [
    "TINY_SEED",
    "RANDOM",
    "PRECISIONS",
    "BackboneSpec",
    "Backbone",
    "BackboneLoadError",
    "UnknownBackboneError",
    "BACKBONES",
    "list_backbones",
    "load_backbone",
]

#: Seed of the tiny backbone's random initialisation (changing it changes every tiny embedding).
TINY_SEED = 20240601

#: ``pretrained`` value asking for an open_clip architecture with seeded random weights.
RANDOM = "random"
#: ``Backbone.encode`` precisions: auto = bf16/fp16 autocast on CUDA, fp32 on CPU.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}

_TINY_CONFIG_FILE = Path(__file__).parent / "geopipe-tiny.json"
_TINY_ARCH = _TINY_CONFIG_FILE.stem  # open_clip model name of the tiny config: "geopipe-tiny"
_HF_PREFIX = "hf-hub:"


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


# --------------------------------------------------------------------------- helpers


def _open_clip():
    import open_clip  # heavy (torchvision, timm): only when a backbone is actually needed

    if _TINY_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_TINY_CONFIG_FILE)
    return open_clip


@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's root-logger warning that the (deliberately) random tiny model is random."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_state_dict(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every state-dict entry in sorted order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _finish(model: torch.nn.Module, preprocess, spec: BackboneSpec, fingerprint: str, device) -> Backbone:
    model = model.to(device).eval()
    model.requires_grad_(False)
    pp = _jsonable(dict(model.visual.preprocess_cfg))
    embed_dim = int(getattr(model.visual, "output_dim", 0) or 0)
    if embed_dim <= 0:  # e.g. timm towers: ask the model
        size = pp["size"] if isinstance(pp["size"], list) else [pp["size"], pp["size"]]
        with torch.no_grad():
            embed_dim = int(model.encode_image(torch.zeros(1, 3, *size, device=device)).shape[-1])
    identity = {
        "name": spec.name,
        "pretrained": spec.pretrained,
        "embed_dim": embed_dim,
        "preprocess": pp,
        "fingerprint": fingerprint,
    }
    json.dumps(identity)  # fail here, not in a writer, if something is not JSON-able
    return Backbone(model=model, preprocess=preprocess, embed_dim=embed_dim, identity=identity)


def _load_error(spec: BackboneSpec, exc: BaseException) -> BackboneLoadError:
    what = f"backbone {spec.name!r}" + (f" (pretrained={spec.pretrained!r})" if spec.pretrained else "")
    hint = ("pass a local checkpoint file as pretrained=..., or make the weights available in the "
            "Hugging Face cache (HF_HOME) / ~/.cache/clip before running offline")
    if spec.pretrained and os.path.isfile(spec.pretrained):
        hint = "check that the checkpoint file matches the architecture"
    return BackboneLoadError(f"could not load {what}: {_one_line(exc)}; {hint}")


def _unknown_name(name: str, candidates: list[str]) -> UnknownBackboneError:
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=6, cutoff=0.5)]
    shown = close or ["tiny"] + [c for c in candidates if c.startswith("ViT-")][:6]
    return UnknownBackboneError(
        f"unknown backbone {name!r}; did you mean one of {shown}? (choose 'tiny', one of "
        f"{len(candidates) - 1} open_clip models from list_backbones(), or 'hf-hub:org/repo')"
    )


# --------------------------------------------------------------------------- factories


def _load_tiny(spec: BackboneSpec, device) -> Backbone:
    oc = _open_clip()
    ckpt = spec.pretrained
    if ckpt is not None and not os.path.isfile(ckpt):
        raise UnknownBackboneError(
            f"backbone 'tiny' takes pretrained=None (seeded random weights) or a checkpoint file; "
            f"{ckpt!r} is not a file"
        )
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # caller's RNG untouched
            torch.manual_seed(TINY_SEED)
            model, _, preprocess = oc.create_model_and_transforms(
                _TINY_ARCH, pretrained=ckpt, device="cpu", force_image_size=spec.image_size
            )
    except Exception as exc:  # open_clip raises bare RuntimeErrors for bad checkpoints
        raise _load_error(spec, exc) from exc
    fingerprint = _sha256_file(ckpt) if ckpt else _sha256_state_dict(model)
    return _finish(model, preprocess, spec, fingerprint, device)


def _load_open_clip(spec: BackboneSpec, device) -> Backbone:
    oc = _open_clip()
    arch = spec.name.replace("/", "-")
    tags = oc.list_pretrained_tags_by_model(arch)
    p = spec.pretrained
    if p is None:
        raise UnknownBackboneError(
            f"backbone {spec.name!r} needs pretrained=<tag or checkpoint file>; tags: {tags} "
            f"(use 'tiny' for a random test backbone, or pretrained={RANDOM!r} for random weights)"
        )
    if p == RANDOM:
        return _load_random(oc, arch, spec, device)
    is_tag = oc.is_pretrained_cfg(arch, p)
    if not is_tag and not os.path.isfile(p):
        close = difflib.get_close_matches(p, tags, n=6, cutoff=0.4) or tags
        raise UnknownBackboneError(
            f"pretrained {p!r} for backbone {spec.name!r} is neither an open_clip tag nor an existing file; "
            f"tags: {close}"
        )
    try:
        model, preprocess = oc.create_model_from_pretrained(
            arch, pretrained=p, device=device, force_image_size=spec.image_size
        )
    except Exception as exc:
        raise _load_error(spec, exc) from exc
    fingerprint = hashlib.sha256(f"{arch}|{p}".encode()).hexdigest() if is_tag else _sha256_file(p)
    return _finish(model, preprocess, spec, fingerprint, device)


def _load_random(oc, arch: str, spec: BackboneSpec, device) -> Backbone:
    """An open_clip architecture with random weights drawn under :data:`TINY_SEED` (no download)."""
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # caller's RNG untouched
            torch.manual_seed(TINY_SEED)
            model, _, preprocess = oc.create_model_and_transforms(arch, pretrained=None, device="cpu",
                                                                  force_image_size=spec.image_size)
    except Exception as exc:
        raise _load_error(spec, exc) from exc
    return _finish(model, preprocess, spec, _sha256_state_dict(model), device)


def _load_hf_hub(spec: BackboneSpec, device) -> Backbone:
    oc = _open_clip()
    if spec.pretrained is not None:
        raise ValueError(f"backbone {spec.name!r}: hf-hub ids carry their own weights; leave pretrained=None")
    try:
        model, preprocess = oc.create_model_from_pretrained(
            spec.name, device=device, force_image_size=spec.image_size
        )
    except Exception as exc:
        raise _load_error(spec, exc) from exc
    return _finish(model, preprocess, spec, hashlib.sha256(spec.name.encode()).hexdigest(), device)


#: Backbones defined by geopipe itself, name → factory(spec, device). Any open_clip
#: architecture name and any ``hf-hub:org/repo`` id are accepted besides these.
BACKBONES: dict[str, Callable[[BackboneSpec, Any], Backbone]] = {"tiny": _load_tiny, **VISION_TOWERS}


def list_backbones() -> list[str]:
    """Names accepted by :func:`load_backbone` (besides ``hf-hub:`` ids): geopipe's own ("tiny" first), then open_clip's."""
    oc = _open_clip()
    return sorted(BACKBONES, key=lambda n: (n != "tiny", n)) + [m for m in oc.list_models() if m != _TINY_ARCH]


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """Load the backbone ``spec`` names onto ``device``, frozen and in eval mode.

    Raises UnknownBackboneError (a ValueError) for unknown names or tags, with close matches,
    and BackboneLoadError (a RuntimeError) when weights cannot be downloaded or loaded.
    """
    if not isinstance(spec, BackboneSpec):
        raise TypeError(f"load_backbone expects a BackboneSpec, got {type(spec).__name__}")
    if spec.name in BACKBONES:
        return BACKBONES[spec.name](spec, device)
    if spec.name.startswith(_HF_PREFIX):
        if not spec.name[len(_HF_PREFIX):].strip("/"):
            raise UnknownBackboneError(f"backbone {spec.name!r}: expected 'hf-hub:org/repo'")
        return _load_hf_hub(spec, device)
    names = list_backbones()
    if spec.name.replace("/", "-") not in names:
        raise _unknown_name(spec.name, names)
    return _load_open_clip(spec, device)

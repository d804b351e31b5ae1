"""Frozen image backbones (open_clip) that turn preprocessed images into embeddings.

A :class:`BackboneSpec` names a backbone; :func:`load_backbone` turns it into a
:class:`Backbone` (eval-mode frozen model + eval preprocessing + JSON identity). Names:

* ``"tiny"`` — a real open_clip CLIP model (config ``pipeline/vision/geopipe-tiny.json``:
  ViT 64 px, patch 8, width 64, 2 layers, 2 heads, embed_dim 64; ≈0.2M parameters) with
  random weights drawn under the fixed seed :data:`TINY_SEED`, so every process gets the same
  weights. ``pretrained`` may instead be a local checkpoint file of that architecture.
* any open_clip architecture (``"ViT-L-14"``, ``"ViT-B-32"``, …) with ``pretrained`` = an
  open_clip tag (``"openai"``, ``"laion2b_s34b_b79k"``, …), a local checkpoint file path, or
  :data:`RANDOM` (``"random"``: seeded random weights, for benchmarks and offline tests);
* ``"hf-hub:org/repo"`` — an open_clip model published on the Hugging Face Hub;
* ``"dinov2-vitl14-reg"`` and ``"streetclip"`` — the towers of the published PLONK models
  (timm / transformers, :mod:`geopipe.pipeline.vision.towers`).
* ``"cosplace-resnet50-2048"``, ``"eigenplaces-resnet50-2048"``, … — the place-recognition
  networks of CosPlace and EigenPlaces (:mod:`geopipe.pipeline.vision.vpr_nets`; unit-norm
  descriptors).

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
from pathlib import Path
from typing import Any

import torch

from geopipe.pipeline.vision.spec import (
    PRECISIONS,
    RANDOM,
    TINY_SEED,
    Backbone,
    BackboneLoadError,
    BackboneSpec,
    UnknownBackboneError,
    jsonable,
    load_error,
    sha256_file,
    sha256_state_dict,
)
from geopipe.pipeline.vision.towers import VISION_TOWERS
from geopipe.pipeline.vision.vpr_nets import VPR_NETS

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

_TINY_CONFIG_FILE = Path(__file__).parent / "geopipe-tiny.json"
_TINY_ARCH = _TINY_CONFIG_FILE.stem  # open_clip model name of the tiny config: "geopipe-tiny"
_HF_PREFIX = "hf-hub:"


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


def _finish(model: torch.nn.Module, preprocess, spec: BackboneSpec, fingerprint: str, device) -> Backbone:
    model = model.to(device).eval()
    model.requires_grad_(False)
    pp = jsonable(dict(model.visual.preprocess_cfg))
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
        raise load_error(spec, exc) from exc
    fingerprint = sha256_file(ckpt) if ckpt else sha256_state_dict(model)
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
        raise load_error(spec, exc) from exc
    fingerprint = hashlib.sha256(f"{arch}|{p}".encode()).hexdigest() if is_tag else sha256_file(p)
    return _finish(model, preprocess, spec, fingerprint, device)


def _load_random(oc, arch: str, spec: BackboneSpec, device) -> Backbone:
    """An open_clip architecture with random weights drawn under :data:`TINY_SEED` (no download)."""
    try:
        with torch.random.fork_rng(devices=[]), _quiet_random_init():  # caller's RNG untouched
            torch.manual_seed(TINY_SEED)
            model, _, preprocess = oc.create_model_and_transforms(arch, pretrained=None, device="cpu",
                                                                  force_image_size=spec.image_size)
    except Exception as exc:
        raise load_error(spec, exc) from exc
    return _finish(model, preprocess, spec, sha256_state_dict(model), device)


def _load_hf_hub(spec: BackboneSpec, device) -> Backbone:
    oc = _open_clip()
    if spec.pretrained is not None:
        raise ValueError(f"backbone {spec.name!r}: hf-hub ids carry their own weights; leave pretrained=None")
    try:
        model, preprocess = oc.create_model_from_pretrained(
            spec.name, device=device, force_image_size=spec.image_size
        )
    except Exception as exc:
        raise load_error(spec, exc) from exc
    return _finish(model, preprocess, spec, hashlib.sha256(spec.name.encode()).hexdigest(), device)


#: Backbones defined by geopipe itself, name → factory(spec, device). Any open_clip
#: architecture name and any ``hf-hub:org/repo`` id are accepted besides these.
BACKBONES: dict[str, Callable[[BackboneSpec, Any], Backbone]] = {"tiny": _load_tiny, **VISION_TOWERS, **VPR_NETS}


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

"""The vision towers the published PLONK models were trained on, registered into ``BACKBONES``.

* ``"dinov2-vitl14-reg"`` — DINOv2 ViT-L/14 with 4 registers through timm
  (``vit_large_patch14_reg4_dinov2``, published weights ``timm/vit_large_patch14_reg4_dinov2.lvd142m``).
  Embedding = the final-LayerNorm CLS token, (B, 1024): what torch.hub's ``dinov2_vitl14_reg``
  ``model(x)`` returns. Preprocessing as PLONK's ``DinoV2FeatureExtractor``: largest centred square
  (torchvision ``center_crop``), resize to 336 px bicubic, ImageNet mean/std.
  Numerical differences from the torch.hub model, all at float32 rounding level: (1) the hub model
  resamples its 37×37 position grid to 24×24 on every forward call (``F.interpolate``, bicubic,
  ``antialias=True``, by size, ``interpolate_offset=0`` for the register models); here the same call
  runs once at load time on the CPU (timm's ``checkpoint_filter_fn``), so on CUDA the grid comes from
  the CPU kernel instead of the CUDA one; (2) the CLS position embedding is folded into the CLS token
  at load (cls + pos₀, the same float32 sum the hub model forms per call); (3) attention goes through
  ``F.scaled_dot_product_attention`` (timm) instead of the hub's attention module (xformers or an
  explicit softmax, depending on its version).
* ``"streetclip"`` — StreetCLIP's vision tower (``geolocal/StreetCLIP``, CLIP ViT-L/14 at 336 px) via
  transformers ``CLIPVisionModel``. Embedding = ``last_hidden_state[:, 0]``, the CLS token before the
  post-LayerNorm and the projection, (B, 1024). Preprocessing as the (PIL) ``CLIPImageProcessor``:
  shortest side to 336 bicubic, centre crop 336 with floor offsets (torchvision rounds them, which
  moves odd margins by one pixel), CLIP mean/std; equal to the PIL processor's output, whereas
  transformers 5's default (torchvision) processor differs from it by up to 0.015 after normalisation.
  Needs the optional extra ``geopipe[streetclip]``.

``pretrained`` of a :class:`~geopipe.pipeline.vision.spec.BackboneSpec`: None = the published
weights from the Hugging Face Hub (honours HF_HUB_OFFLINE and the HF cache), ``"random"`` = seeded
random weights (:data:`~geopipe.pipeline.vision.spec.TINY_SEED`), or a local ``.safetensors`` file
(DINOv2: timm's or the original facebookresearch key layout; StreetCLIP: ``CLIPModel`` or
``CLIPVisionModel`` keys; a ``save_pretrained`` directory also works for StreetCLIP). Weights are
never unpickled by geopipe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from geopipe.pipeline.core.provenance import install_hint
from geopipe.pipeline.vision.spec import RANDOM as _RANDOM

__all__ = [
    "TowerInfo",
    "DINOV2",
    "STREETCLIP",
    "TOWERS",
    "VISION_TOWERS",
    "DinoV2Tower",
    "ClipVisionTower",
    "dinov2_preprocess",
    "clip_preprocess",
    "dinov2_model",
    "streetclip_model",
    "published_identity",
    "hub_offline",
    "hub_cache_dir",
]


_TIMM_ARCH = "vit_large_patch14_reg4_dinov2"
#: CLIP ViT-L/14-336 vision config of StreetCLIP (used for "random" and single-file weights).
_STREETCLIP_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                      "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
#: Keys of a full CLIPModel checkpoint that the vision tower does not use.
_CLIP_SKIP = ("text_model.", "visual_projection.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


@dataclass(frozen=True)
class TowerInfo:
    """A registered tower: registry name, Hub repo of its published weights, embedding width D,
    input size (px), resize mode ("square_crop": largest centred square then resize; "shortest":
    shortest side then centre crop) and normalisation."""

    name: str
    hub_repo: str
    embed_dim: int
    image_size: int
    resize_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocess_dict(self) -> dict:
        """JSON-able preprocessing description recorded in the backbone identity."""
        return {"size": self.image_size, "interpolation": "bicubic", "resize_mode": self.resize_mode,
                "mean": list(self.mean), "std": list(self.std)}


DINOV2 = TowerInfo("dinov2-vitl14-reg", "timm/vit_large_patch14_reg4_dinov2.lvd142m", 1024, 336, "square_crop",
                   (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
STREETCLIP = TowerInfo("streetclip", "geolocal/StreetCLIP", 1024, 336, "shortest",
                       (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TOWERS: dict[str, TowerInfo] = {t.name: t for t in (DINOV2, STREETCLIP)}


def hub_offline() -> bool:
    """Whether Hugging Face downloads are off: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE read now (not at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hugging Face Hub cache folder, read now: HF_HUB_CACHE, else $HF_HOME/hub, else the library default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def published_identity(name: str) -> dict:
    """Identity of tower ``name`` with its published weights: exactly what ``load_backbone(BackboneSpec(name))``
    records, computed without loading anything (fingerprint = sha256 of "name|hf-hub:repo")."""
    info = TOWERS[name]
    return {"name": info.name, "pretrained": None, "embed_dim": info.embed_dim, "preprocess": info.preprocess_dict(),
            "fingerprint": hashlib.sha256(f"{info.name}|hf-hub:{info.hub_repo}".encode()).hexdigest()}


# --------------------------------------------------------------------------- preprocessing


class _Preprocess:
    """PIL image → (3, size, size) float32, the tower's way (module docstring); a plain class, so it pickles."""

    def __init__(self, info: TowerInfo, size: int) -> None:
        self.info, self.size = info, size

    def __call__(self, img) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        img, s = (img if img.mode == "RGB" else img.convert("RGB")), self.size
        if self.info.resize_mode == "square_crop":  # largest centred square (torchvision offsets, as PLONK), then resize
            img = F.center_crop(img, [min(img.size)] * 2)
        img = F.resize(img, s, interpolation=InterpolationMode.BICUBIC)  # PIL: shortest side to s
        if self.info.resize_mode == "shortest":  # centre crop with floor offsets, as transformers
            left, top = (img.size[0] - s) // 2, (img.size[1] - s) // 2
            img = img.crop((left, top, left + s, top + s))
        return F.normalize(F.to_tensor(img), self.info.mean, self.info.std)


def dinov2_preprocess(size: int = DINOV2.image_size) -> Callable[[Any], torch.Tensor]:
    """PIL image → (3, size, size) float32: largest centred square, bicubic resize, ImageNet normalisation."""
    return _Preprocess(DINOV2, size)


def clip_preprocess(size: int = STREETCLIP.image_size) -> Callable[[Any], torch.Tensor]:
    """PIL image → (3, size, size) float32: shortest side to ``size`` bicubic, floor centre crop, CLIP normalisation."""
    return _Preprocess(STREETCLIP, size)


# --------------------------------------------------------------------------- adapters


class DinoV2Tower(nn.Module):
    """A timm DINOv2 ViT (``num_classes=0``, token pooling) exposing ``encode_image``: (B, 3, H, W) → (B, D)
    final-norm CLS tokens."""

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        self.trunk = trunk

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    forward = encode_image


class ClipVisionTower(nn.Module):
    """A transformers ``CLIPVisionModel`` exposing ``encode_image``: (B, 3, H, W) → (B, D) =
    ``last_hidden_state[:, 0]`` (CLS token before post-LayerNorm and projection)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state[:, 0]

    forward = encode_image


# --------------------------------------------------------------------------- weights


@contextlib.contextmanager
def _seeded():
    """Seeded random initialisation (TINY_SEED) that leaves the caller's RNG untouched."""
    from geopipe.pipeline.vision.spec import TINY_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        yield


def _hub_file(repo: str, filename: str) -> str:
    """Path of ``filename`` of Hub repo ``repo`` (cache or download); one-line BackboneLoadError otherwise."""
    from huggingface_hub import hf_hub_download

    from geopipe.pipeline.vision.spec import BackboneLoadError

    try:
        return hf_hub_download(repo, filename, cache_dir=hub_cache_dir(), local_files_only=hub_offline())
    except Exception as exc:  # offline without cache, connection errors, missing repo
        how = "downloads are off (HF_HUB_OFFLINE)" if hub_offline() else f"the download failed ({type(exc).__name__})"
        raise BackboneLoadError(f"{repo}/{filename} is not in the Hugging Face cache {hub_cache_dir()} and {how}: run "
                                f"`hf download {repo} {filename}` once online, or pass pretrained=<local .safetensors file>") from None


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from geopipe.pipeline.vision.spec import BackboneLoadError

    try:
        return load_file(path)
    except Exception as exc:
        raise BackboneLoadError(f"cannot read weights {path}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}; "
                                f"pass a .safetensors file (geopipe never unpickles weights)") from None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    from geopipe.pipeline.vision.spec import BackboneLoadError

    own = model.state_dict()
    bad = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected or bad:
        shape = f"{bad[0]}: file {tuple(state[bad[0]].shape)}, model {tuple(own[bad[0]].shape)}" if bad else ""
        raise BackboneLoadError(f"{what} does not fit the architecture: {len(missing)} missing (e.g. {missing[:2]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(bad)} of another shape {shape}")
    model.load_state_dict(state)


def dinov2_model(weights: str | None = None, *, image_size: int = DINOV2.image_size, **arch) -> DinoV2Tower:
    """DINOv2-with-registers tower at ``image_size`` px (a multiple of 14). weights: None (published), "random"
    (seeded) or a .safetensors file in timm's or the original facebookresearch layout, its position grid (e.g.
    37×37) resampled to ``image_size // 14`` as torch.hub does at run time. ``arch``: timm overrides (tests)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = weights if weights != _RANDOM else None
    if weights is None:
        path = _hub_file(DINOV2.hub_repo, "model.safetensors")
    with _seeded():
        trunk = timm.create_model(_TIMM_ARCH, pretrained=False, img_size=image_size, num_classes=0, **arch)
    if path is not None:
        state = checkpoint_filter_fn(_read_safetensors(path), trunk)  # bicubic + antialias grid resampling
        _load_strict(trunk, state, f"DINOv2 weights {path}")
    return DinoV2Tower(trunk)


def _transformers():
    from geopipe.pipeline.vision.spec import BackboneLoadError

    try:
        import transformers
    except ImportError:
        raise BackboneLoadError(f"backbone 'streetclip' needs the transformers package: {install_hint('streetclip')}") from None
    return transformers


def _clip_vision_state(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """CLIPModel / CLIPVisionModel keys → this transformers version's CLIPVisionModel keys (with or without
    the ``vision_model.`` prefix); text tower, projections and position ids are dropped."""
    prefixed = any(k.startswith("vision_model.") for k in own)
    out = {}
    for k, v in state.items():
        if k.startswith(_CLIP_SKIP) or k == "embeddings.position_ids":
            continue
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out["vision_model." + bare if prefixed else bare] = v
    return out


def streetclip_model(weights: str | None = None, *, config: dict | None = None) -> ClipVisionTower:
    """StreetCLIP vision tower. weights: None (published ``geolocal/StreetCLIP`` from the Hub), "random"
    (seeded), a ``save_pretrained`` directory, or a .safetensors file with CLIPModel or CLIPVisionModel keys.
    ``config`` overrides the CLIP ViT-L/14-336 vision config for "random" and single files (tests)."""
    tf = _transformers()
    if weights is None or (weights != _RANDOM and os.path.isdir(weights)):
        source = weights if weights is not None else STREETCLIP.hub_repo
        kw = {} if weights is not None else {"cache_dir": hub_cache_dir(), "local_files_only": hub_offline()}
        try:
            model = tf.CLIPVisionModel.from_pretrained(source, **kw)
        except Exception as exc:
            from geopipe.pipeline.vision.spec import BackboneLoadError

            hint = (f"run `hf download {source}` once online (cache {hub_cache_dir()})" if weights is None
                    else "check that the directory holds a CLIP config.json and its weights")
            raise BackboneLoadError(f"cannot load StreetCLIP from {source}: {type(exc).__name__}: "
                                    f"{' '.join(str(exc).split())[:160]}; {hint}") from None
        return ClipVisionTower(model)
    with _seeded():
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**(config or _STREETCLIP_VISION)))
    if weights != _RANDOM:
        state = _clip_vision_state(_read_safetensors(weights), set(model.state_dict()))
        _load_strict(model, state, f"StreetCLIP weights {weights}")
    return ClipVisionTower(model)


# --------------------------------------------------------------------------- registry factories


def _check_spec(spec, info: TowerInfo, dirs: bool) -> None:
    from geopipe.pipeline.vision.spec import UnknownBackboneError

    p = spec.pretrained
    if spec.image_size not in (None, info.image_size):
        raise UnknownBackboneError(f"backbone {info.name!r} runs at {info.image_size} px as PLONK trained it; leave image_size unset")
    if p is None or p == _RANDOM or os.path.isfile(p) or (dirs and os.path.isdir(p)):
        return
    raise UnknownBackboneError(f"backbone {info.name!r} takes pretrained=None (published weights, Hugging Face Hub "
                               f"{info.hub_repo}), {_RANDOM!r} (seeded random weights) or a local .safetensors file"
                               f"{' or save_pretrained directory' if dirs else ''}; {p!r} is none of these")


def _finish(tower: nn.Module, info: TowerInfo, spec, device):
    from geopipe.pipeline.vision.spec import Backbone, sha256_file, sha256_state_dict

    p = spec.pretrained
    if p is None:
        identity = published_identity(info.name)
    else:
        fingerprint = sha256_file(p) if os.path.isfile(p) else sha256_state_dict(tower)
        identity = {"name": info.name, "pretrained": p, "embed_dim": info.embed_dim, "preprocess": info.preprocess_dict(),
                    "fingerprint": fingerprint}
    json.dumps(identity)  # fail here, not in a writer
    tower = tower.to(device).eval().requires_grad_(False)
    return Backbone(model=tower, preprocess=_Preprocess(info, info.image_size), embed_dim=info.embed_dim, identity=identity)


def _load_dinov2(spec, device):
    _check_spec(spec, DINOV2, dirs=False)
    return _finish(_guarded(lambda: dinov2_model(spec.pretrained), spec), DINOV2, spec, device)


def _load_streetclip(spec, device):
    _check_spec(spec, STREETCLIP, dirs=True)
    return _finish(_guarded(lambda: streetclip_model(spec.pretrained), spec), STREETCLIP, spec, device)


def _guarded(load: Callable[[], nn.Module], spec) -> nn.Module:
    """Unexpected library errors (timm, transformers) → one-line BackboneLoadError naming the backbone."""
    from geopipe.pipeline.vision.spec import BackboneLoadError, UnknownBackboneError, load_error

    try:
        return load()
    except (BackboneLoadError, UnknownBackboneError):
        raise
    except Exception as exc:
        raise load_error(spec, exc) from exc


#: name → factory(spec, device), merged into ``backbones.BACKBONES``.
VISION_TOWERS: dict[str, Callable] = {DINOV2.name: _load_dinov2, STREETCLIP.name: _load_streetclip}

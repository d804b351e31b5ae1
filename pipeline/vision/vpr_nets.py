"""Place-recognition networks of CosPlace and EigenPlaces, registered into ``BACKBONES``.

Both papers (Berton et al., CVPR 2022 and ICCV 2023; code MIT) use one architecture: a
torchvision CNN cut before its pooling — ResNet-18/50/101/152 up to ``layer4``, or VGG-16's
``features`` without the last ReLU and max-pool — then L2-normalise over channels, GeM pooling
(p learnt, initialised 3, eps 1e-6), flatten, a linear layer to the descriptor width D and
L2-normalise: ``(B, 3, H, W) → (B, D)`` unit vectors. The module names follow the published
checkpoints, so their state dicts load as they are: ``backbone.<i>.…`` (the cut CNN as an
``nn.Sequential``: ResNet conv1, bn1, relu, maxpool, layer1–4 = indices 0–7), ``aggregation.1.p``
(GeM), ``aggregation.3.weight/bias`` (the linear layer). Written here; no code is fetched.

Registry names ``<method>-<backbone>-<D>`` (:data:`VPR_NETS`), e.g. ``cosplace-resnet50-2048``,
``eigenplaces-resnet50-2048``, ``cosplace-vgg16-512``: the widths each method published.
``pretrained``: None = the published weights (GitHub release of the method, fetched once into
torch.hub's cache; offline without a cached copy: a one-line BackboneLoadError), "random"
(seeded), or a local ``.safetensors`` / ``.pth`` file — ``.pth`` is read with
``torch.load(weights_only=True)``, never unpickled as code.

Preprocessing as the official test code (VPR-methods-evaluation, CosPlace ``test.py``): RGB,
to tensor, ImageNet mean/std. Those evaluate full-resolution images one at a time; geopipe
batches, so every image is resized to H × W = 480 × 640 (bilinear, antialiased) — the size of
Pitts30k and Tokyo 24/7 database images, so those are unchanged. ``image_size`` s sets H = s,
W = round(4s/3).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VprNetInfo", "VPR_NET_INFO", "VPR_NETS", "GeM", "GeoLocalizationNet",
           "vpr_preprocess", "vpr_net"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_HEIGHT = 480
_CHANNELS = {"ResNet18": 512, "ResNet50": 2048, "ResNet101": 2048, "ResNet152": 2048, "VGG16": 512}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # the last max-pool is cut
#: Published descriptor widths per backbone (the methods' torch.hub ``AVAILABLE_TRAINED_MODELS``).
_WIDTHS = {
    "cosplace": {"VGG16": (64, 128, 256, 512), "ResNet18": (32, 64, 128, 256, 512), "ResNet50": (32, 64, 128, 256, 512, 1024, 2048),
                 "ResNet101": (32, 64, 128, 256, 512, 1024, 2048), "ResNet152": (32, 64, 128, 256, 512, 1024, 2048)},
    "eigenplaces": {"VGG16": (512,), "ResNet18": (256, 512), "ResNet50": (128, 256, 512, 1024, 2048),
                    "ResNet101": (128, 256, 512, 1024, 2048)},
}
_URL = {"cosplace": "https://github.com/gmberton/CosPlace/releases/download/v1.0/{b}_{d}_cosplace.pth",
        "eigenplaces": "https://github.com/gmberton/EigenPlaces/releases/download/v1.0/{b}_{d}_eigenplaces.pth"}


@dataclass(frozen=True)
class VprNetInfo:
    """A registered network: registry name, method, torchvision backbone ("ResNet50"), descriptor
    width D, URL of the published weights."""

    name: str
    method: str
    backbone: str
    embed_dim: int
    url: str

    def preprocess_dict(self, height: int = _HEIGHT) -> dict:
        """JSON-able preprocessing recorded in the backbone identity."""
        return {"size": [height, round(4 * height / 3)], "interpolation": "bilinear", "resize_mode": "hard_resize",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


#: name → info of every published (method, backbone, width).
VPR_NET_INFO: dict[str, VprNetInfo] = {
    f"{m}-{b.lower()}-{d}": VprNetInfo(f"{m}-{b.lower()}-{d}", m, b, d, _URL[m].format(b=b, d=d))
    for m, table in _WIDTHS.items() for b, dims in table.items() for d in dims
}


class GeM(nn.Module):
    """Generalised-mean pooling over H × W: (B, C, H, W) → (B, C, 1, 1), ((1/HW) Σ max(x, eps)^p)^(1/p)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.eps = nn.Parameter(torch.ones(1) * p), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), (x.size(-2), x.size(-1))).pow(1.0 / self.p)


class _L2Norm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


def _trunk(backbone: str) -> nn.Sequential:
    """The CNN cut before pooling, as an ``nn.Sequential`` with the published module indices."""
    if backbone == "VGG16":
        layers, c_in = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        return nn.Sequential(*layers[:-1])  # the last ReLU is cut too
    import torchvision

    net = getattr(torchvision.models, backbone.lower())(weights=None)
    return nn.Sequential(*list(net.children())[:-2])  # without avgpool and fc


class GeoLocalizationNet(nn.Module):
    """CNN → L2 → GeM → flatten → Linear(C, D) → L2 (module docstring); ``encode_image``:
    (B, 3, H, W) ImageNet-normalised images → (B, D) unit-norm float descriptors."""

    def __init__(self, backbone: str, embed_dim: int) -> None:
        super().__init__()
        self.backbone = _trunk(backbone)
        self.aggregation = nn.Sequential(_L2Norm(), GeM(), _Flatten(), nn.Linear(_CHANNELS[backbone], embed_dim), _L2Norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.aggregation(self.backbone(x))

    encode_image = forward


class _Preprocess:
    """PIL image → (3, H, W) float32: RGB, hard resize, to tensor, ImageNet mean/std (picklable)."""

    def __init__(self, height: int) -> None:
        self.size = [height, round(4 * height / 3)]

    def __call__(self, img) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        img = img if img.mode == "RGB" else img.convert("RGB")
        img = TF.resize(img, self.size, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)


def vpr_preprocess(height: int = _HEIGHT) -> Callable:
    """The preprocessing of the VPR nets (module docstring) at H = ``height``, W = round(4·height/3)."""
    return _Preprocess(height)


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    from geopipe.pipeline.vision.spec import BackboneLoadError, one_line

    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no code is unpickled
    except Exception as exc:
        raise BackboneLoadError(f"cannot read weights {path}: {one_line(exc, 200)}; pass a .safetensors file or a "
                                f"plain state-dict .pth") from None
    state = state.get("model_state_dict", state) if isinstance(state, dict) else state
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel checkpoints


def _published(info: VprNetInfo) -> dict[str, torch.Tensor]:
    """The published state dict (torch.hub's cache, or downloaded once), read with weights_only=True."""
    from geopipe.pipeline.vision.spec import BackboneLoadError, one_line

    try:
        return torch.hub.load_state_dict_from_url(info.url, map_location="cpu", weights_only=True, progress=False)
    except Exception as exc:  # offline, no cached copy, HTTP errors
        cache = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise BackboneLoadError(f"cannot fetch the published {info.name} weights {info.url} ({one_line(exc, 120)}); download "
                                f"the file once online into {cache}, or pass pretrained=<local .pth or .safetensors file>") from None


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    from geopipe.pipeline.vision.spec import BackboneLoadError

    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad:
        raise BackboneLoadError(f"{what} does not fit the architecture: {len(missing)} missing (e.g. {missing[:2]}), "
                                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(bad)} of another shape (e.g. {bad[:2]})")
    model.load_state_dict(state)


def vpr_net(name: str, weights: str | None = None) -> GeoLocalizationNet:
    """The network ``name`` (:data:`VPR_NET_INFO`) with weights None (published), "random" (seeded
    by :data:`~geopipe.pipeline.vision.spec.TINY_SEED`) or a local file; eval mode, frozen."""
    from geopipe.pipeline.vision.spec import RANDOM, TINY_SEED

    info = VPR_NET_INFO[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = GeoLocalizationNet(info.backbone, info.embed_dim)
    if weights != RANDOM:
        state = _published(info) if weights is None else _read_weights(weights)
        _load_strict(model, state, f"{name} weights {weights or info.url}")
    return model.eval().requires_grad_(False)


def _factory(info: VprNetInfo):
    def load(spec, device):
        from geopipe.pipeline.vision.spec import RANDOM, Backbone, BackboneLoadError, UnknownBackboneError, load_error, sha256_file, sha256_state_dict

        p, height = spec.pretrained, spec.image_size or _HEIGHT
        if p is not None and p != RANDOM and not os.path.isfile(p):
            raise UnknownBackboneError(f"backbone {info.name!r} takes pretrained=None (published weights, {info.url}), "
                                       f"{RANDOM!r} (seeded random weights) or a local .pth/.safetensors file; {p!r} is none of these")
        try:
            model = vpr_net(info.name, p)
        except (BackboneLoadError, UnknownBackboneError):
            raise
        except Exception as exc:  # torchvision / torch errors: one line naming the backbone
            raise load_error(spec, exc) from exc
        fingerprint = (hashlib.sha256(f"{info.name}|{info.url}".encode()).hexdigest() if p is None
                       else sha256_file(p) if p != RANDOM else sha256_state_dict(model))
        identity = {"name": info.name, "pretrained": p, "embed_dim": info.embed_dim, "preprocess": info.preprocess_dict(height),
                    "fingerprint": fingerprint}
        json.dumps(identity)
        return Backbone(model=model.to(device), preprocess=_Preprocess(height), embed_dim=info.embed_dim, identity=identity)

    return load


#: name → factory(spec, device), merged into ``backbones.BACKBONES``.
VPR_NETS: dict[str, Callable] = {name: _factory(info) for name, info in VPR_NET_INFO.items()}

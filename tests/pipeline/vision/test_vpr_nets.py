"""CosPlace / EigenPlaces networks at random init (offline): shapes, unit norm, widths, and
state dicts in the published key layout (synthetic values) loading from .safetensors and .pth."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from geopipe.pipeline.vision.backbones import BACKBONES, BackboneSpec, load_backbone
from geopipe.pipeline.vision.spec import BackboneLoadError, UnknownBackboneError
from geopipe.pipeline.vision.vpr_nets import VPR_NET_INFO, vpr_net, vpr_preprocess


def _published_keys(backbone: str) -> list[str]:
    """The published checkpoints' keys, derived from the CosPlace construction rule (not from our
    module): torchvision ResNet children conv1, bn1, relu, maxpool, layer1-4 become backbone.0-7;
    VGG-16's conv layers keep their ``features`` indices; GeM p and the linear layer follow."""
    import torchvision

    if backbone == "VGG16":
        convs = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
        keys = [f"backbone.{i}.{p}" for i in convs for p in ("weight", "bias")]
    else:
        names = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
        sd = getattr(torchvision.models, backbone.lower())(weights=None).state_dict()
        keys = [f"backbone.{names[k.split('.')[0]]}.{k.split('.', 1)[1]}" for k in sd if not k.startswith("fc.")]
    return keys + ["aggregation.1.p", "aggregation.3.weight", "aggregation.3.bias"]


@pytest.mark.parametrize("name", ["cosplace-resnet18-512", "cosplace-resnet50-2048", "cosplace-vgg16-64", "eigenplaces-resnet18-256",
                                  "cosplace-resnet101-128", "cosplace-resnet152-32"])
def test_random_init_unit_norm_descriptors_of_the_documented_width(name):
    info = VPR_NET_INFO[name]
    bb = load_backbone(BackboneSpec(name, "random", image_size=48))
    x = torch.stack([bb.preprocess(Image.fromarray(np.full((30, 50, 3), 40 * i, np.uint8))) for i in range(2)])
    assert x.shape == (2, 3, 48, 64)
    z = bb.encode(x)
    assert z.shape == (2, info.embed_dim) == (2, bb.embed_dim) and torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert bb.identity["preprocess"]["size"] == [48, 64] and bb.identity["embed_dim"] == info.embed_dim
    assert sorted(bb.model.state_dict()) == sorted(_published_keys(info.backbone))


def test_registry_holds_every_published_width():
    assert {n for n in BACKBONES if n.startswith("cosplace-")} >= {"cosplace-resnet50-2048", "cosplace-vgg16-512", "cosplace-resnet18-32"}
    assert "eigenplaces-resnet50-2048" in BACKBONES and "eigenplaces-resnet152-2048" not in BACKBONES
    assert VPR_NET_INFO["eigenplaces-resnet50-2048"].url.endswith("/EigenPlaces/releases/download/v1.0/ResNet50_2048_eigenplaces.pth")
    assert VPR_NET_INFO["cosplace-resnet50-2048"].url.endswith("/CosPlace/releases/download/v1.0/ResNet50_2048_cosplace.pth")
    dims = {i.embed_dim for i in VPR_NET_INFO.values()}
    assert min(dims) == 32 and max(dims) == 2048


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_state_dict_in_the_published_layout_loads(tmp_path, suffix):
    from safetensors.torch import save_file

    keys = _published_keys("ResNet18")
    shapes = {k: v.shape for k, v in vpr_net("cosplace-resnet18-256", "random").state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(shapes[k], generator=gen) * 0.05 if "num_batches" not in k else torch.tensor(0)) for k in keys}
    state["aggregation.1.p"] = torch.tensor([2.5])
    path = str(tmp_path / f"w{suffix}")
    save_file(state, path) if suffix == ".safetensors" else torch.save({f"module.{k}": v for k, v in state.items()}, path)
    net = vpr_net("cosplace-resnet18-256", path)
    assert all(torch.equal(net.state_dict()[k], state[k]) for k in keys)
    bb = load_backbone(BackboneSpec("cosplace-resnet18-256", path))
    assert bb.identity["pretrained"] == path and len(bb.identity["fingerprint"]) == 64
    del state["aggregation.3.bias"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(BackboneLoadError, match="1 missing"):
        vpr_net("cosplace-resnet18-256", str(tmp_path / "bad.safetensors"))


def test_published_weights_offline_and_bad_pretrained_are_one_line_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneLoadError, match="cannot fetch the published cosplace-resnet18-32 weights https://github.com"):
        load_backbone(BackboneSpec("cosplace-resnet18-32"))
    with pytest.raises(UnknownBackboneError, match="takes pretrained=None"):
        load_backbone(BackboneSpec("cosplace-resnet18-32", "nope.pth"))
    assert not os.listdir(tmp_path)


def test_preprocess_is_a_hard_resize_with_imagenet_normalisation():
    x = vpr_preprocess(480)(Image.new("RGB", (1632, 1224), (124, 116, 104)))
    assert x.shape == (3, 480, 640) and float(x.abs().max()) < 0.01

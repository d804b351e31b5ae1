"""Backbone registry: the tiny seeded open_clip model, errors for unknown names and offline downloads."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from geopipe.pipeline.vision.backbones import (
    BACKBONES,
    Backbone,
    BackboneLoadError,
    BackboneSpec,
    UnknownBackboneError,
    list_backbones,
    load_backbone,
)


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(BackboneSpec("tiny"))


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Offline Hugging Face hub with an empty cache, and any socket use is an error."""
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))  # open_clip's URL cache ~/.cache/clip
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time otherwise
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_is_small_frozen_open_clip_model(tiny):
    import open_clip

    assert isinstance(tiny.model, open_clip.CLIP)
    assert tiny.embed_dim == 64
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 10_000 < n_params < 1_000_000
    assert not tiny.model.training
    assert not any(p.requires_grad for p in tiny.model.parameters())
    ident = tiny.identity
    assert set(ident) == {"name", "pretrained", "embed_dim", "preprocess", "fingerprint"}
    assert json.loads(json.dumps(ident)) == ident
    assert ident["name"] == "tiny" and ident["pretrained"] is None and ident["embed_dim"] == 64
    assert ident["preprocess"]["size"] == [64, 64]
    assert len(ident["fingerprint"]) == 64 and int(ident["fingerprint"], 16) >= 0


def test_tiny_weights_are_seeded_and_leave_global_rng_alone(tiny):
    torch.manual_seed(1)
    expected_next = torch.rand(3)
    torch.manual_seed(1)
    again = load_backbone(BackboneSpec("tiny"))
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream untouched
    a, b = _state(tiny.model), _state(again.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.identity == tiny.identity


def test_tiny_fingerprint_is_stable_across_processes(tiny):
    code = (
        "from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone;"
        "import torch; torch.manual_seed(99);"
        "print(load_backbone(BackboneSpec('tiny')).identity['fingerprint'])"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == tiny.identity["fingerprint"]


def test_preprocess_and_encode(tiny):
    images = [Image.new("RGB", (100, 80), c) for c in [(200, 10, 10), (10, 200, 10), (10, 10, 200)]]
    x = torch.stack([tiny.preprocess(im) for im in images])
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    z = tiny.encode(x)
    assert z.shape == (3, 64) and z.dtype == torch.float32 and z.device.type == "cpu"
    assert torch.isfinite(z).all()
    assert not torch.allclose(z[0], z[1])  # different colours, different embeddings
    assert torch.allclose(tiny.encode(x[1:2])[0], z[1], atol=1e-5)  # batch-independent
    assert z.grad_fn is None


def test_encode_rejects_bad_input(tiny):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="dtype"):
        tiny.encode(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_image_size_override():
    small = load_backbone(BackboneSpec("tiny", image_size=32))
    x = small.preprocess(Image.new("RGB", (50, 70), (90, 120, 30)))
    assert x.shape == (3, 32, 32)
    assert small.identity["preprocess"]["size"] == [32, 32]
    assert small.encode(x[None]).shape == (1, 64)


def test_registry_lists_tiny_and_open_clip_models():
    names = list_backbones()
    assert "tiny" in BACKBONES and names[0] == "tiny"
    assert "ViT-B-32" in names and "ViT-L-14" in names
    assert "geopipe-tiny" not in names  # internal open_clip config name


@pytest.mark.parametrize("name, suggestion", [("ViT-L-41", "ViT-L-14"), ("tinny", "tiny"), ("vit-b-32", "ViT-B-32")])
def test_unknown_name_lists_close_choices(name, suggestion):
    with pytest.raises(UnknownBackboneError) as info:
        load_backbone(BackboneSpec(name, "openai"))
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert repr(name) in msg and repr(suggestion) in msg and "hf-hub:" in msg


def test_unknown_tag_and_missing_pretrained_list_tags(tmp_path):
    with pytest.raises(UnknownBackboneError, match="laion2b_s34b_b79k"):
        load_backbone(BackboneSpec("ViT-B-32", "laion2b_s34b"))
    with pytest.raises(UnknownBackboneError, match="openai"):
        load_backbone(BackboneSpec("ViT-B-32"))
    with pytest.raises(UnknownBackboneError, match="not a file"):
        load_backbone(BackboneSpec("tiny", str(tmp_path / "missing.pt")))


def test_bad_spec_values_are_rejected():
    for kwargs in [dict(name=""), dict(name="tiny", image_size=0), dict(name="tiny", image_size=True)]:
        with pytest.raises(ValueError):
            BackboneSpec(**kwargs)
    with pytest.raises(ValueError, match="pretrained=None"):
        load_backbone(BackboneSpec("hf-hub:org/repo", "openai"))


@pytest.mark.parametrize("spec", [BackboneSpec("ViT-B-32", "laion2b_s34b_b79k"), BackboneSpec("ViT-B-32", "openai"),
                                  BackboneSpec("hf-hub:geolocal/StreetCLIP")])
def test_download_failure_is_one_clear_line(no_network, spec):
    start = time.monotonic()
    with pytest.raises(BackboneLoadError) as info:
        load_backbone(spec)
    assert time.monotonic() - start < 10.0
    msg = str(info.value)
    assert "\n" not in msg and repr(spec.name) in msg and "checkpoint" in msg
    if spec.pretrained:
        assert repr(spec.pretrained) in msg


def test_local_checkpoint_round_trip(tiny, tmp_path):
    state = _state(tiny.model)
    key = "visual.proj"
    state[key] = state[key] + 1.0  # weights that the seed alone cannot produce
    path = tmp_path / "tiny.pt"
    torch.save(state, path)
    loaded = load_backbone(BackboneSpec("tiny", str(path)))
    got = _state(loaded.model)
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k]) for k in state)
    assert not torch.equal(got[key], _state(tiny.model)[key])
    assert loaded.identity["fingerprint"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.identity["fingerprint"] != tiny.identity["fingerprint"]
    assert loaded.identity["pretrained"] == str(path)


def test_incompatible_checkpoint_is_a_load_error(tiny, tmp_path):
    state = _state(tiny.model)
    del state["visual.proj"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(BackboneLoadError, match="visual.proj"):
        load_backbone(BackboneSpec("tiny", str(path)))

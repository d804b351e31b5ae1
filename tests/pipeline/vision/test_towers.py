"""PLONK's vision towers (DINOv2-reg through timm, StreetCLIP through transformers) on small random models
of the same classes: shapes, preprocessing sizes and equality with the reference processors, published
key layouts, position-grid resampling as torch.hub's DINOv2 does it, stable identities, offline errors."""

from __future__ import annotations

import hashlib
import json
import socket
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from geopipe.pipeline.vision import towers as vt
from geopipe.pipeline.vision.backbones import BACKBONES, BackboneLoadError, BackboneSpec, UnknownBackboneError, load_backbone

SMALL_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 42, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}


@pytest.fixture()
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path / "hf"


def _image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img.convert(mode)


def _save(tmp_path, state: dict, name: str = "w.safetensors") -> str:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


# ----------------------------------------------------------------------------- registry and identities


def test_towers_are_registered_with_stable_json_identities():
    assert BACKBONES["dinov2-vitl14-reg"] is vt.VISION_TOWERS["dinov2-vitl14-reg"]
    assert BACKBONES["streetclip"] is vt.VISION_TOWERS["streetclip"]
    for name in vt.TOWERS:
        ident = vt.published_identity(name)
        assert ident == vt.published_identity(name) == json.loads(json.dumps(ident))
        assert set(ident) == {"name", "pretrained", "embed_dim", "preprocess", "fingerprint"}
        assert ident["embed_dim"] == 1024 and ident["preprocess"]["size"] == 336 and ident["pretrained"] is None
    assert vt.published_identity("streetclip")["fingerprint"] != vt.published_identity("dinov2-vitl14-reg")["fingerprint"]


def test_identity_of_local_file_and_random_weights_is_stable(tmp_path):
    path = _save(tmp_path, vt.dinov2_model("random", image_size=42, **SMALL_VIT).trunk.state_dict())
    spec = BackboneSpec("dinov2-vitl14-reg", pretrained=path)
    a = vt._finish(vt.dinov2_model(path, image_size=42, **SMALL_VIT), vt.DINOV2, spec, "cpu")
    b = vt._finish(vt.dinov2_model(path, image_size=42, **SMALL_VIT), vt.DINOV2, spec, "cpu")
    assert a.identity == b.identity and a.identity["fingerprint"] == hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert a.identity["pretrained"] == path and a.embed_dim == 1024
    rnd = BackboneSpec("dinov2-vitl14-reg", pretrained="random")
    r1 = vt._finish(vt.dinov2_model("random", image_size=42, **SMALL_VIT), vt.DINOV2, rnd, "cpu")
    r2 = vt._finish(vt.dinov2_model("random", image_size=42, **SMALL_VIT), vt.DINOV2, rnd, "cpu")
    assert r1.identity["fingerprint"] == r2.identity["fingerprint"] != a.identity["fingerprint"]
    assert not any(p.requires_grad for p in r1.model.parameters()) and not r1.model.training
    json.dumps(r1.identity)


# ----------------------------------------------------------------------------- DINOv2


def test_dinov2_tower_returns_the_final_norm_cls_token():
    tower = vt.dinov2_model("random", image_size=42, **SMALL_VIT).eval()
    x = torch.randn(3, 3, 42, 42)
    with torch.no_grad():
        z = tower.encode_image(x)
        tokens = tower.trunk.forward_features(x)  # (B, 1 + 4 registers + 9 patches, D), after the final norm
    assert z.shape == (3, 32) and tokens.shape == (3, 14, 32)
    torch.testing.assert_close(z, tokens[:, 0], rtol=0, atol=0)
    again = vt.dinov2_model("random", image_size=42, **SMALL_VIT)  # seeded: same weights every time
    assert all(torch.equal(a, b) for a, b in zip(tower.state_dict().values(), again.state_dict().values()))


def test_dinov2_published_timm_layout_resamples_the_grid_as_torch_hub(tmp_path):
    import timm

    torch.manual_seed(0)
    native = timm.create_model("vit_large_patch14_reg4_dinov2", img_size=70, num_classes=0, dynamic_img_size=True, **SMALL_VIT).eval()
    path = _save(tmp_path, native.state_dict())  # the Hub's layout: 5×5 position grid, no CLS row
    tower = vt.dinov2_model(path, image_size=42, **SMALL_VIT).eval()  # 3×3 grid
    grid = native.pos_embed.detach().reshape(1, 5, 5, 32).permute(0, 3, 1, 2)
    hub = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True)  # dinov2_vitl14_reg: offset 0, antialias
    torch.testing.assert_close(tower.trunk.pos_embed, hub.permute(0, 2, 3, 1).reshape(1, 9, 32), rtol=0, atol=0)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():  # resampling once at load == resampling on every call (dynamic size)
        torch.testing.assert_close(tower.encode_image(x), native(x), rtol=1e-6, atol=1e-6)


def test_dinov2_original_facebook_layout_loads(tmp_path):
    ref = vt.dinov2_model("random", image_size=70, **SMALL_VIT).trunk.state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: v for k, v in ref.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    state.update(cls_token=torch.randn(1, 1, 32, generator=g), pos_embed=torch.randn(1, 26, 32, generator=g),
                 register_tokens=torch.randn(1, 4, 32, generator=g), mask_token=torch.zeros(1, 32))
    tower = vt.dinov2_model(_save(tmp_path, state), image_size=70, **SMALL_VIT)
    torch.testing.assert_close(tower.trunk.cls_token, state["cls_token"] + state["pos_embed"][:, :1], rtol=0, atol=0)
    torch.testing.assert_close(tower.trunk.pos_embed, state["pos_embed"][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(tower.trunk.reg_token, state["register_tokens"], rtol=0, atol=0)


def test_dinov2_bad_weights_are_one_line_errors(tmp_path):
    state = vt.dinov2_model("random", image_size=42, **SMALL_VIT).trunk.state_dict()
    del state["norm.weight"]
    with pytest.raises(BackboneLoadError, match=r"1 missing \(e.g. \['norm.weight'\]\)"):
        vt.dinov2_model(_save(tmp_path, state), image_size=42, **SMALL_VIT)
    pickled = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(BackboneLoadError, match="never unpickles"):
        vt.dinov2_model(str(pickled), image_size=42, **SMALL_VIT)


def test_dinov2_preprocess_is_plonks_square_crop_then_resize():
    pre = vt.dinov2_preprocess()
    img = _image(500, 300)
    x = pre(img)
    assert x.shape == (3, 336, 336) and x.dtype == torch.float32
    crop = img.crop((100, 0, 400, 300)).resize((336, 336), Image.BICUBIC)  # largest centred square
    want = (np.asarray(crop, dtype=np.float32) / 255 - np.array(vt.DINOV2.mean, np.float32)) / np.array(vt.DINOV2.std, np.float32)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), want, atol=1e-5)
    assert pre(_image(300, 301, mode="L")).shape == (3, 336, 336)


# ----------------------------------------------------------------------------- StreetCLIP


def _tiny_clip_model():
    tf = pytest.importorskip("transformers")
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    torch.manual_seed(0)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=TINY_CLIP, projection_dim=16)).eval()


def test_streetclip_published_clipmodel_layout_loads_and_gives_the_cls_token(tmp_path):
    clip = _tiny_clip_model()
    path = _save(tmp_path, clip.state_dict())  # text tower, projections, logit_scale included
    tower = vt.streetclip_model(path, config=TINY_CLIP).eval()
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        z = tower.encode_image(x)
        want = clip.vision_model(pixel_values=x).last_hidden_state[:, 0]  # before post-LayerNorm and projection
    assert z.shape == (2, 32)
    torch.testing.assert_close(z, want, rtol=0, atol=0)
    again = vt.streetclip_model(_save(tmp_path, tower.model.state_dict(), "vision.safetensors"), config=TINY_CLIP)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(x), z, rtol=0, atol=0)
    clip.save_pretrained(tmp_path / "dir")
    with torch.no_grad():
        torch.testing.assert_close(vt.streetclip_model(str(tmp_path / "dir")).eval().encode_image(x), z, rtol=0, atol=0)
    bad = {k: v for k, v in clip.state_dict().items() if "post_layernorm" not in k}
    with pytest.raises(BackboneLoadError, match="post_layernorm"):
        vt.streetclip_model(_save(tmp_path, bad, "bad.safetensors"), config=TINY_CLIP)


@pytest.mark.parametrize("w,h", [(401, 337), (337, 401), (500, 336), (999, 1000), (200, 150)])
def test_clip_preprocess_matches_transformers_pil_processor(w, h):
    tf = pytest.importorskip("transformers")
    cls = getattr(tf, "CLIPImageProcessorPil", None)
    kw = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336},
          "image_mean": list(vt.STREETCLIP.mean), "image_std": list(vt.STREETCLIP.std)}
    proc = cls(**kw) if cls is not None else tf.CLIPImageProcessor(**kw)  # transformers 4: the PIL one
    img = _image(w, h, seed=w + h)
    x = vt.clip_preprocess()(img)
    assert x.shape == (3, 336, 336)
    want = proc(images=img, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(x, want.float(), rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- registry errors


def test_load_backbone_rejects_bad_options_and_missing_weights_offline(offline_hub, tmp_path):
    with pytest.raises(UnknownBackboneError, match="is none of these"):
        load_backbone(BackboneSpec("dinov2-vitl14-reg", pretrained=str(tmp_path / "nowhere.safetensors")))
    with pytest.raises(UnknownBackboneError, match="336 px"):
        load_backbone(BackboneSpec("streetclip", image_size=224))
    with pytest.raises(BackboneLoadError) as e:
        load_backbone(BackboneSpec("dinov2-vitl14-reg"))
    assert "hf download timm/vit_large_patch14_reg4_dinov2.lvd142m model.safetensors" in str(e.value)
    assert "\n" not in str(e.value) and str(offline_hub) in str(e.value)
    pytest.importorskip("transformers")
    with pytest.raises(BackboneLoadError, match="hf download geolocal/StreetCLIP") as e:
        load_backbone(BackboneSpec("streetclip"))
    assert "\n" not in str(e.value)


def test_streetclip_without_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import fails as if not installed
    with pytest.raises(BackboneLoadError, match=r"pip install 'geopipe-geolocation\[streetclip\]'"):
        load_backbone(BackboneSpec("streetclip", pretrained="random"))

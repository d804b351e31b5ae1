"""PLONK hub models → geopipe: key layout, parameter counts, a fake offline HF cache, and equality of
geopipe's network with a re-implementation of PLONK's forward pass (written here from the spec, §4.2)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from geopipe.pipeline.artifacts import plonk
from geopipe.pipeline.artifacts.checkpoint import save_checkpoint
from geopipe.pipeline.artifacts.plonk import PLONK_BACKBONES, is_plonk_dir, read_plonk, resolve_model_source
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.infer.predictor import load_predictor
from geopipe.pipeline.methods.registry import get_method, method_from_dict
from geopipe.pipeline.model.network import GeoAdaLNMLP, NetworkConfig, count_parameters
from geopipe.pipeline.vision.towers import published_identity

SMALL = {"input_dim": 3, "dim": 64, "depth": 2, "expansion": 4, "cond_dim": 32}
REV = "0123456789abcdef0123456789abcdef01234567"


# ----------------------------------------------------------------------------- PLONK's network, from the spec


class _Block(nn.Module):
    def __init__(self, d: int, e: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, e * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(e * d, d))
        self.ada_map = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        self.ln = nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x, s):
        scale, shift, gate = self.ada_map(s).chunk(3, dim=-1)
        return x + self.mlp((1 + scale) * self.ln(x) + shift) * gate


class _Encode(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        k = torch.arange(channels // 2, dtype=torch.float32)
        self.register_buffer("freqs", (1 / 10000) ** (2 * k / channels))  # persistent, as in PLONK's file

    def forward(self, x):
        a = torch.outer(x, self.freqs)
        return torch.cat([a.cos(), a.sin()], dim=1)


class _TimeEmbedder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.encode_time = _Encode(d // 4)
        self.map_time = nn.Sequential(nn.Linear(d // 4, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, gamma):
        r = self.encode_time(gamma * 1000)
        return self.map_time((r - r.mean(dim=-1, keepdim=True)) / r.std(dim=-1, keepdim=True))


class PlonkReference(nn.Module):
    """GeoAdaLNMLP with PLONK's module names: forward(y (B, 3), gamma (B,), emb (B, cond_dim)) → (B, 3)."""

    def __init__(self, input_dim, dim, depth, expansion, cond_dim) -> None:
        super().__init__()
        self.time_embedder = _TimeEmbedder(dim)
        self.cond_mapper = nn.Linear(cond_dim, dim)
        self.initial_mapper = nn.Linear(input_dim, dim)
        self.blocks = nn.ModuleList(_Block(dim, expansion) for _ in range(depth))
        self.final_adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.final_ln = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_linear = nn.Linear(dim, input_dim)

    def forward(self, y, gamma, emb):
        x = self.initial_mapper(y)
        s = self.cond_mapper(emb) + self.time_embedder(gamma)
        for block in self.blocks:
            x = block(x, s)
        scale, shift = self.final_adaln(s).chunk(2, dim=-1)
        return self.final_linear((1 + scale) * self.final_ln(x) + shift)


def _random_plonk(cfg: dict, seed: int = 0) -> PlonkReference:
    torch.manual_seed(seed)
    net = PlonkReference(**cfg)
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised layer: every weight matters
            p.copy_(torch.randn_like(p) * 0.3)
    return net


def _write_hub(cache, repo: str, cfg: dict, state: dict) -> str:
    """A Hugging Face cache entry: models--org--name/{refs/main, snapshots/<rev>/{config.json, model.safetensors}}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REV)
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))
    return str(snap)


@pytest.fixture()
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache under tmp_path/hf; any socket use is an error."""
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return cache


# ----------------------------------------------------------------------------- layout and counts


@pytest.mark.parametrize("dim,params", [(512, 36_034_563), (256, 9_153_539)])
def test_full_size_layout_maps_onto_geopipe_network(dim, params):
    cfg = {"input_dim": 3, "dim": dim, "depth": 12, "expansion": 4, "cond_dim": 1024}
    with torch.device("meta"):
        ref, ours = PlonkReference(**cfg), GeoAdaLNMLP(NetworkConfig.from_dict(cfg))
    assert count_parameters(ref) == count_parameters(ours) == params
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert theirs.pop("time_embedder.encode_time.freqs") == (dim // 8,)
    assert theirs == plonk._expected_shapes(cfg)
    assert {f"blocks.{i}.mlp.3.weight" for i in range(12)} <= set(theirs)
    mapped = {plonk._geopipe_key(k): shape for k, shape in theirs.items()}
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_every_published_repo_has_a_backbone():
    assert PLONK_BACKBONES["nicolas-dufour/PLONK_YFCC"] == "dinov2-vitl14-reg"
    assert PLONK_BACKBONES["nicolas-dufour/PLONK_iNaturalist"] == "dinov2-vitl14-reg"
    assert PLONK_BACKBONES["nicolas-dufour/PLONK_OSV_5M"] == "streetclip"


# ----------------------------------------------------------------------------- numerics through the fake cache


def test_fake_hub_cache_loads_and_matches_plonk_forward_in_float64(offline_hub):
    ref = _random_plonk(SMALL)
    folder = _write_hub(offline_hub, "org/name", SMALL, ref.state_dict())
    resolved = resolve_model_source("hf-hub:org/name")
    assert resolved == folder and is_plonk_dir(resolved)
    ident = {"name": "test-tower", "pretrained": None, "embed_dim": 32, "preprocess": {}, "fingerprint": "x"}
    config, state = read_plonk(resolved, backbone=ident)
    assert config["source"]["repo"] == "org/name" and config["source"]["revision"] == REV
    assert len(config["source"]["sha256"]) == 64 and config["backbone"] == ident

    net = GeoAdaLNMLP(NetworkConfig.from_dict(config["network"]))
    net.load_state_dict(state, strict=True)
    net, ref = net.double().eval(), ref.double().eval()
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 3, generator=g, dtype=torch.float64)
    gamma = torch.rand(64, generator=g, dtype=torch.float64)
    gamma[:3] = torch.tensor([1e-9, 0.5, 1.0], dtype=torch.float64)
    cond = torch.randn(64, 32, generator=g, dtype=torch.float64) * 3
    with torch.no_grad():
        ours, theirs = net(y, gamma, cond), ref(y, gamma, cond)
    assert theirs.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_config_is_a_geopipe_checkpoint_the_predictor_loads(tmp_path, offline_hub):
    ref = _random_plonk(SMALL, seed=3)
    folder = _write_hub(offline_hub, "org/name", SMALL, ref.state_dict())
    ident = {"name": "test-tower", "pretrained": None, "embed_dim": 32, "preprocess": {}, "fingerprint": "x"}
    config, state = read_plonk(resolve_model_source("hf-hub:org/name"), backbone=ident)
    want = get_method("rfm", schedule="sigmoid", schedule_params={"start": -7, "end": 3, "tau": 1}).to_dict()
    assert config["method"] == want == method_from_dict(config["method"]).to_dict()
    assert config["method"]["sampler"] == "riemann_euler"
    assert (config["normalized"], config["condition"], config["step"], config["embed_dim"]) == (False, None, 0, 32)
    assert config["source"]["format"] == "plonk" and folder

    ckpt = save_checkpoint(tmp_path / "ckpt", model_state=state, config=config)
    pred = load_predictor(str(ckpt), torch.device("cpu"))
    cond = torch.randn(5, 32)
    torch.testing.assert_close(pred.condition(cond.numpy()), cond)  # identity conditioning: raw embeddings
    y, gamma = torch.nn.functional.normalize(torch.randn(5, 3), dim=-1), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(pred.model(y, gamma, cond), ref(y, gamma, cond), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("repo,tower,method", [
    ("nicolas-dufour/PLONK_YFCC", "dinov2-vitl14-reg", "rfm"),
    ("nicolas-dufour/PLONK_iNaturalist", "dinov2-vitl14-reg", "rfm"),
    ("nicolas-dufour/PLONK_OSV_5M", "streetclip", "rfm"),
    ("nicolas-dufour/PLONK_OSV_5M_flow", "streetclip", "flow"),
])
def test_repo_id_names_backbone_and_method(offline_hub, repo, tower, method):
    cfg = {**SMALL, "depth": 1, "cond_dim": 1024}
    _write_hub(offline_hub, repo, cfg, _random_plonk(cfg).state_dict())
    config, _ = read_plonk(resolve_model_source(f"hf-hub:{repo}"))
    assert config["backbone"] == published_identity(tower)
    assert config["method"]["name"] == method and config["source"]["repo"] == repo
    assert method_from_dict(config["method"]).to_dict() == config["method"]


# ----------------------------------------------------------------------------- errors


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def _local(tmp_path, state: dict, cfg: dict = SMALL):
    d = tmp_path / "plonk"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    return d


IDENT = {"name": "t", "embed_dim": 32}


def test_unmapped_missing_and_misshaped_keys_are_named(tmp_path):
    good = _random_plonk(SMALL).state_dict()
    with pytest.raises(GeopipeError) as e:
        read_plonk(_local(tmp_path, {**good, "blocks.2.ada_map.1.weight": torch.zeros(192, 64)}), backbone=IDENT)
    assert "blocks.2.ada_map.1.weight" in _one_line(e) and "unmapped" in str(e.value)
    with pytest.raises(GeopipeError) as e:
        read_plonk(_local(tmp_path, {k: v for k, v in good.items() if k != "final_linear.bias"}), backbone=IDENT)
    assert "final_linear.bias" in _one_line(e) and "missing" in str(e.value)
    with pytest.raises(GeopipeError) as e:
        read_plonk(_local(tmp_path, {**good, "cond_mapper.weight": torch.zeros(64, 31)}), backbone=IDENT)
    assert "cond_mapper.weight" in _one_line(e) and "(64, 32)" in str(e.value)
    with pytest.raises(GeopipeError) as e:
        read_plonk(_local(tmp_path, {**good, "time_embedder.encode_time.freqs": good["time_embedder.encode_time.freqs"] * 2}), backbone=IDENT)
    assert "encode_time.freqs" in _one_line(e)
    state = {k: v for k, v in good.items() if k != "time_embedder.encode_time.freqs"}  # the buffer is optional
    assert read_plonk(_local(tmp_path, state), backbone=IDENT)[0]["embed_dim"] == 32


def test_config_backbone_and_source_errors(tmp_path, offline_hub):
    good = _random_plonk(SMALL).state_dict()
    with pytest.raises(GeopipeError) as e:
        read_plonk(_local(tmp_path, good, {**SMALL, "heads": 2}), backbone=IDENT)
    assert "heads" in _one_line(e)
    d = _local(tmp_path, good)
    with pytest.raises(GeopipeError) as e:
        read_plonk(d)
    assert "backbone=" in _one_line(e) and "unknown" in str(e.value)
    with pytest.raises(GeopipeError) as e:
        read_plonk(d, backbone="streetclip")  # 1024-d tower, 32-d model
    assert "1024" in _one_line(e)
    assert resolve_model_source(str(d)) == str(d)
    with pytest.raises(GeopipeError) as e:
        resolve_model_source("hf-hub:nicolas-dufour/PLONK_YFCC")
    msg = _one_line(e)
    assert "hf download nicolas-dufour/PLONK_YFCC config.json model.safetensors" in msg and str(offline_hub) in msg
    for bad in ("hf-hub:PLONK_YFCC", str(tmp_path / "nowhere"), ""):
        with pytest.raises(GeopipeError):
            resolve_model_source(bad)


def test_is_plonk_dir_tells_plonk_from_geopipe_and_junk(tmp_path):
    d = _local(tmp_path, _random_plonk(SMALL).state_dict())
    assert is_plonk_dir(d)
    (d / "config.json").write_text(json.dumps({"schema": "geopipe.checkpoint/1", **SMALL}))
    assert not is_plonk_dir(d)
    (d / "config.json").write_text("{not json")
    assert not is_plonk_dir(d)
    assert not is_plonk_dir(tmp_path / "nowhere") and not is_plonk_dir(tmp_path)


# ----------------------------------------------------------------------------- the user's entry points


YFCC_SMALL = {"input_dim": 3, "dim": 16, "depth": 1, "expansion": 2, "cond_dim": 1024}  # DINOv2's width, a tiny trunk


def test_geolocator_and_predict_load_a_pretrained_plonk_by_hub_id(offline_hub, tmp_path):
    """``Geolocator.load("hf-hub:nicolas-dufour/PLONK_YFCC")`` from the (offline) Hugging Face cache:
    the backbone comes from the repo id, the network's outputs are PLONK's, and a store of another
    embedding space is refused in one line."""
    import numpy as np

    from geopipe import Geolocator
    from geopipe.pipeline.store.space import EmbeddingSpaceError, check_same_space, embedding_space

    ref = _random_plonk(YFCC_SMALL, seed=5)
    _write_hub(offline_hub, "nicolas-dufour/PLONK_YFCC", YFCC_SMALL, ref.state_dict())
    geo = Geolocator.load("hf-hub:nicolas-dufour/PLONK_YFCC", device="cpu")
    assert geo.space["name"] == "dinov2-vitl14-reg" and geo.space["embed_dim"] == 1024 and geo.space["normalized"] is False
    y, gamma, emb = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1), torch.rand(4), torch.randn(4, 1024)
    with torch.no_grad():
        torch.testing.assert_close(geo.predictor.model(y, gamma, emb), ref(y, gamma, emb), atol=1e-4, rtol=1e-4)
    res = geo.predict(emb.numpy(), samples=3, guidance=0.0)
    assert np.isfinite(res.lat).all() and res.samples.shape == (4, 3, 2)
    assert np.isfinite(res.log_prob(10.0, 20.0)).all()
    tiny_store = embedding_space({"name": "tiny", "fingerprint": "ab" * 32}, 1024, False)
    with pytest.raises(EmbeddingSpaceError, match="'dinov2-vitl14-reg'.*'tiny'"):
        check_same_space("model", geo.space, "store s.zarr", tiny_store)


def test_hub_id_not_cached_offline_is_one_line_naming_what_to_download(offline_hub):
    from geopipe import Geolocator

    with pytest.raises(GeopipeError) as err:
        Geolocator.load("hf-hub:nicolas-dufour/PLONK_iNaturalist", device="cpu")
    assert "\n" not in str(err.value) and "PLONK_iNaturalist" in str(err.value) and "config.json" in str(err.value)

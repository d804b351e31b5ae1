"""Multi-scale location features of the denoisers (docs/methods.md#location-features): shapes,
fixed seeded frequencies that survive save/load, old configs and checkpoints, exact divergence and
an RFM density with features that still integrates to 1 on S²."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.infer.predictor import load_predictor
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.likelihood import field_jacobian
from geopipe.pipeline.model.location import RandomFourierFeatures, rff_frequencies
from geopipe.pipeline.model.network import GeoAdaLNMLP, GeoAdaLNMLPVonMises, NetworkConfig, count_parameters
from geopipe.pipeline.sphere.geometry import fibonacci_sphere, latlon_to_xyz, project
from geopipe.stages.train import TrainConfig, run_train
from tests.tiny_models import tiny_store, untrained_checkpoint

RFF = NetworkConfig(dim=32, depth=2, expansion=2, cond_dim=8, location_features="rff")


def test_features_shape_scales_and_unit_modulus():
    enc = RandomFourierFeatures((1.0, 8.0, 64.0), 200, seed=3)
    y = project(torch.randn(7, 3, dtype=torch.float64))
    phi = enc.to(torch.float64)(y)
    assert phi.shape == (7, 1200) and enc.out_dim == 1200 and phi.dtype == torch.float64
    torch.testing.assert_close(phi[:, :600] ** 2 + phi[:, 600:] ** 2, torch.ones(7, 600, dtype=torch.float64))
    std = enc.freqs.reshape(3, 200 * 3).std(dim=1)  # per scale: N(0, σ²) entries
    torch.testing.assert_close(std, torch.tensor([1.0, 8.0, 64.0], dtype=torch.float64), rtol=0.12, atol=0)


def test_rff_network_shapes_and_parameter_count():
    plain = GeoAdaLNMLP(NetworkConfig(dim=32, depth=2, expansion=2, cond_dim=8))
    net = GeoAdaLNMLP(RFF)
    assert count_parameters(net) - count_parameters(plain) == 2 * 3 * 64 * 32  # the feature projection, no bias
    assert net(torch.randn(5, 3), torch.rand(5), torch.randn(5, 8)).shape == (5, 3)
    assert not any("freqs" in n for n, _ in net.named_parameters())  # a buffer: never trained, never decayed
    assert "loc_features.freqs" in net.state_dict()


def test_frequencies_depend_on_the_seed_only():
    a = GeoAdaLNMLP(RFF).loc_features.freqs
    torch.manual_seed(123)  # the global RNG does not enter
    b = GeoAdaLNMLP(RFF).loc_features.freqs
    assert torch.equal(a, b) and torch.equal(a, rff_frequencies((1.0, 8.0, 64.0), 64, 0))
    other = NetworkConfig(dim=32, depth=2, expansion=2, cond_dim=8, location_features="rff", location_seed=1)
    assert not torch.equal(a, GeoAdaLNMLP(other).loc_features.freqs)


def test_config_round_trip_and_old_dicts():
    old = {"input_dim": 3, "dim": 32, "depth": 2, "expansion": 2, "cond_dim": 8}  # a checkpoint from before the option
    cfg = NetworkConfig.from_dict(old)
    assert cfg.location_features == "none" and cfg.to_dict() == old  # written back exactly as before
    assert GeoAdaLNMLP(cfg).loc_proj is None
    d = json.loads(json.dumps(RFF.to_dict()))
    assert d["location_features"] == "rff" and d["location_scales"] == [1.0, 8.0, 64.0]
    assert NetworkConfig.from_dict(d) == RFF
    for bad in ({"location_features": "sh"}, {"location_scales": (1.0, -2.0)}, {"location_scales": ()},
                {"location_frequencies": 0}, {"location_seed": -1}):
        with pytest.raises(ConfigError):
            NetworkConfig(**{"location_features": "rff", **bad})
    with pytest.raises(ConfigError, match="location features"):
        GeoAdaLNMLPVonMises(NetworkConfig(dim=32, depth=1, cond_dim=8, location_features="rff"))


def test_divergence_sees_the_features():
    """The likelihood's Jacobian (forward-mode, through the features) matches finite differences of ψ in y."""
    torch.manual_seed(0)
    net = GeoAdaLNMLP(RFF).double()
    y, g, c = project(torch.randn(4, 3, dtype=torch.float64)), torch.full((4,), 0.7, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    fn = lambda z: net(z, g, c)  # noqa: E731
    _, jac = field_jacobian(fn, y)
    h = 1e-7  # the finest features vary on 1/(2π·64) ≈ 0.0025: a small step keeps the O(h²) error below atol
    fd = torch.stack([(fn(y + h * e) - fn(y - h * e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64)], dim=-1)
    torch.testing.assert_close(jac, fd, rtol=1e-5, atol=1e-6)
    assert net.loc_proj.weight.abs().sum() > 0  # the features contribute


def _cfg(store, out, **kw):
    base = dict(store=store, out=str(out), dim=16, depth=1, expansion=2, steps=4, batch_size=8, warmup=1, val_every=4,
                device="cpu", progress=False, stream=False)
    return TrainConfig(**{**base, **kw})


def test_trained_checkpoint_keeps_its_features_and_old_ones_load(tmp_path):
    store = tiny_store(tmp_path / "s.zarr", n=24)
    run_train(_cfg(store, tmp_path / "rff", location_features="rff"))
    with open(os.path.join(tmp_path / "rff", "config.json")) as fh:
        saved = json.load(fh)
    assert saved["network"]["location_features"] == "rff" and saved["train"]["location_features"] == "rff"
    p = load_predictor(str(tmp_path / "rff"), torch.device("cpu"))
    assert torch.equal(p.model.loc_features.freqs, rff_frequencies((1.0, 8.0, 64.0), 64, 0))
    y, g, c = project(torch.randn(6, 3)), torch.rand(6), torch.randn(6, 8)
    again = load_predictor(str(tmp_path / "rff"), torch.device("cpu")).model
    with torch.no_grad():
        assert torch.equal(p.model(y, g, c), again(y, g, c))
    # a run without features writes the config exactly as before the option, and resumes as one
    run_train(_cfg(store, tmp_path / "none"))
    with open(os.path.join(tmp_path / "none", "config.json")) as fh:
        saved = json.load(fh)
    assert not any(k.startswith("location") for k in saved["network"]) and "location_features" not in saved["train"]
    assert run_train(_cfg(store, tmp_path / "none", steps=6)).step == 6
    old = load_predictor(untrained_checkpoint(tmp_path / "old", "rfm"), torch.device("cpu"))
    assert old.model.loc_proj is None


def test_rfm_with_features_integrates_to_one_on_the_sphere():
    """A tiny RFM with random Fourier features, trained on a two-cluster toy set: exact NLL still
    gives a density that integrates to 1 on S² (equal-area Fibonacci cells)."""
    method = get_method("rfm")
    torch.manual_seed(0)
    net = GeoAdaLNMLP(NetworkConfig(dim=16, depth=1, cond_dim=4, location_features="rff", location_scales=(1.0, 3.0),
                                    location_frequencies=8))
    torch.nn.init.zeros_(net.time_mlp[2].weight)  # a smooth start in γ (see test_likelihood._smooth_net)
    torch.nn.init.zeros_(net.time_mlp[2].bias)
    g = torch.Generator().manual_seed(0)
    centers = latlon_to_xyz(torch.tensor([[45.0, 10.0], [-20.0, 130.0]]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(80):
        lab = torch.randint(0, 2, (256,), generator=g)
        x = project(centers[lab] + 0.8 * torch.randn(256, 3, generator=g))  # broad clusters: 3,000 cells resolve the density
        loss = method.loss(net, x, torch.nn.functional.one_hot(lab, 4).float(), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    n = 3000
    pts = fibonacci_sphere(n, dtype=torch.float32)
    cond = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4)
    dens = method.log_likelihood(net, pts, cond, rtol=1e-4, atol=1e-4).double().exp()
    assert dens.max() / dens.min() > 20
    assert (dens.mean() * 4 * math.pi).item() == pytest.approx(1.0, abs=0.03)

"""GeoAdaLNMLP and vMF baseline networks (docs/methods.md#network) against the reference implementation's
time features and parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from geopipe.pipeline.model.network import (
    GeoAdaLNMLP,
    GeoAdaLNMLPVonMises,
    NetworkConfig,
    count_parameters,
    time_features,
)

SMALL = NetworkConfig(input_dim=3, dim=32, depth=2, expansion=4, cond_dim=16)


@pytest.mark.parametrize(
    "cfg, components, expected",
    [
        (NetworkConfig(), None, 36_034_563),
        (NetworkConfig(dim=256), None, 9_153_539),
        (NetworkConfig(input_dim=2), None, 36_033_538),
        (NetworkConfig(depth=11), 1, 34_917_380),
        (NetworkConfig(depth=11), 3, 35_973_135),
        (NetworkConfig(dim=256, depth=11), 1, 8_873_476),
    ],
)
def test_parameter_counts_match_spec(cfg, components, expected):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        net = GeoAdaLNMLP(cfg) if components is None else GeoAdaLNMLPVonMises(cfg, components)
    assert count_parameters(net) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_time_features_oracle(dtype):
    """Reference time features: d = 512 → C = 128, γ = 0.5, float32 frequencies.

    The oracle's phases τ·f_k (up to 500 rad) are float32 products, whose rounding (ulp 3e-5 rad)
    moves single features by up to 1.6e-5; the float64 path keeps the exact float64 phase of the
    same float32 frequencies, hence its slightly wider tolerance.
    """
    tol = 1e-5 if dtype == torch.float32 else 2.5e-5
    z = time_features(torch.tensor([0.5], dtype=dtype), 128)[0]
    assert z.dtype == dtype and z.shape == (128,)
    torch.testing.assert_close(z[:3], torch.tensor([-1.6089875, 0.9441651, -0.9780459], dtype=dtype), atol=tol, rtol=0)
    # undo the standardisation with the oracle's mean / unbiased std: the raw cos-then-sin features
    raw = z.double() * 0.6785165 + 0.20787525
    torch.testing.assert_close(raw[0:3], torch.tensor([-0.88384926, 0.84850687, -0.45574504], dtype=torch.float64), atol=tol, rtol=0)
    torch.testing.assert_close(raw[64:67], torch.tensor([-0.4677718, -0.52918434, -0.8901104], dtype=torch.float64), atol=tol, rtol=0)


def test_time_features_are_standardised_per_sample():
    gamma = torch.tensor([0.0, 1e-9, 0.3, 0.97, 1.0], dtype=torch.float64)
    z = time_features(gamma, 64)
    torch.testing.assert_close(z.mean(dim=1), torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z.std(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(z[2], time_features(gamma[2:3], 64)[0])  # rows are independent
    with pytest.raises(ValueError, match="even"):
        time_features(gamma, 63)


def _reference_forward(net: GeoAdaLNMLP, y, gamma, cond):
    """The forward pass written out with explicit formulas (own LayerNorm and erf-GELU)."""
    d = net.cfg.dim

    def ln(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-5)

    def lin(layer, x):
        return x @ layer.weight.T + layer.bias

    def silu(x):
        return x / (1 + torch.exp(-x))

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    c_ch = d // 4
    f = (1.0 / 10000.0) ** (torch.arange(c_ch // 2, dtype=torch.float32) / (c_ch // 2))
    arg = (1000.0 * gamma)[:, None] * f.double()[None, :]
    r = torch.cat([torch.cos(arg), torch.sin(arg)], 1)
    z = (r - r.mean(1, keepdim=True)) / torch.sqrt(((r - r.mean(1, keepdim=True)) ** 2).sum(1, keepdim=True) / (c_ch - 1))
    e_t = lin(net.time_mlp[2], silu(lin(net.time_mlp[0], z)))
    s = lin(net.cond_proj, cond) + e_t
    h = lin(net.in_proj, y)
    for blk in net.trunk.blocks:
        ada = lin(blk.ada, silu(s))
        a, b, g = ada[:, :d], ada[:, d : 2 * d], ada[:, 2 * d :]
        hm = (1 + a) * ln(h) + b
        h = h + g * lin(blk.mlp[2], gelu(lin(blk.mlp[0], hm)))
    fa = lin(net.trunk.final_ada, silu(s))
    h = (1 + fa[:, :d]) * ln(h) + fa[:, d:]
    return lin(net.out_proj, h)


@pytest.mark.parametrize("input_dim", [3, 2])
def test_forward_matches_spec_formulas(input_dim):
    torch.manual_seed(0)
    net = GeoAdaLNMLP(NetworkConfig(input_dim=input_dim, dim=32, depth=2, cond_dim=16)).double()
    with torch.no_grad():  # make the zero-initialised second MLP linears non-trivial
        for blk in net.trunk.blocks:
            blk.mlp[2].weight.normal_(0, 0.1)
            blk.mlp[2].bias.normal_(0, 0.1)
    y = torch.randn(5, input_dim, dtype=torch.float64)
    gamma = torch.rand(5, dtype=torch.float64)
    cond = torch.randn(5, 16, dtype=torch.float64)
    out = net(y, gamma, cond)
    assert out.shape == (5, input_dim)
    torch.testing.assert_close(out, _reference_forward(net, y, gamma, cond), atol=1e-10, rtol=1e-10)


def test_blocks_are_identity_at_init():
    torch.manual_seed(1)
    net = GeoAdaLNMLP(SMALL).double()
    seen = []
    for blk in net.trunk.blocks:
        assert torch.count_nonzero(blk.mlp[2].weight) == 0 and torch.count_nonzero(blk.mlp[2].bias) == 0
        assert torch.count_nonzero(blk.ada.weight) > 0  # AdaLN projection keeps its default init
        blk.register_forward_hook(lambda mod, args, out: seen.append(torch.equal(out, args[0])))
    net(torch.randn(4, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64))
    assert seen == [True, True]


def test_scalar_gamma_broadcasts_and_bad_shapes_raise():
    net = GeoAdaLNMLP(SMALL)
    y, cond = torch.randn(3, 3), torch.randn(3, 16)
    torch.testing.assert_close(net(y, torch.tensor(0.4), cond), net(y, torch.full((3,), 0.4), cond))
    with pytest.raises(ValueError, match="condition"):
        net(y, torch.full((3,), 0.4), torch.randn(3, 15))
    with pytest.raises(ValueError, match="y must have shape"):
        net(torch.randn(3, 2), torch.full((3,), 0.4), cond)


@pytest.mark.parametrize("components", [1, 3])
def test_vmf_network_outputs(components):
    torch.manual_seed(2)
    net = GeoAdaLNMLPVonMises(NetworkConfig(dim=32, depth=2, cond_dim=16), components=components)
    assert net.register_token.abs().max() <= 0.04  # truncated normal
    p = net(torch.randn(6, 16))
    assert p.mu.shape == (6, components, 3) and p.kappa.shape == (6, components) and p.weights.shape == (6, components)
    torch.testing.assert_close(p.mu.norm(dim=-1), torch.ones(6, components))
    assert bool((p.kappa > 0).all())
    torch.testing.assert_close(p.weights.sum(-1), torch.ones(6))
    if components == 1:
        assert bool((p.weights == 1).all())
    with pytest.raises(ValueError, match="components"):
        GeoAdaLNMLPVonMises(SMALL, components=0)


def test_config_round_trip_and_validation():
    cfg = NetworkConfig(input_dim=2, dim=256, depth=11)
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    assert NetworkConfig.from_dict({}) == NetworkConfig()
    with pytest.raises(ValueError, match=r"unknown network config key\(s\) \['width'\].*valid keys.*'dim'"):
        NetworkConfig.from_dict({"width": 512})
    with pytest.raises(ValueError, match="depth"):
        NetworkConfig.from_dict({"depth": "12"})
    with pytest.raises(ValueError, match="multiple of 8"):
        NetworkConfig(dim=100)

"""Localizability, entropy, effective area and HDR ranks (docs/methods.md#localizability, docs/methods.md#calibration)."""

import math

import pytest
import torch

from geopipe.pipeline.infer.localizability import (
    effective_area_km2,
    entropy_bits,
    hdr_rank,
    localizability_from_logp,
    localize,
    neg_entropy_nats,
)
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.network import GeoAdaLNMLP, NetworkConfig, VMFParams
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, LOG_UNIFORM_SPHERE, latlon_to_xyz

F64 = torch.float64
PARIS = latlon_to_xyz(torch.tensor([[48.8566, 2.3522]], dtype=F64))


class _FixedVMF(torch.nn.Module):
    """vMF head stand-in: the same (μ, κ) for every record."""

    def __init__(self, mu, kappa):
        super().__init__()
        self.mu, self.kappa = mu, kappa

    def forward(self, cond):
        b = cond.shape[0]
        return VMFParams(self.mu.expand(b, 1, 3), self.kappa.expand(b, 1), torch.ones(b, 1, dtype=cond.dtype))


def test_uniform_method_is_minus_log_4pi_and_whole_earth():
    u = get_method("uniform")
    loc = localize(u, u.build_model(), torch.zeros(3, 8), 64, generator=torch.Generator().manual_seed(0))
    assert loc.samples.shape == (3, 64, 3) and loc.sample_logp.shape == (3, 64)
    torch.testing.assert_close(loc.neg_entropy_nats, torch.full((3,), LOG_UNIFORM_SPHERE))
    torch.testing.assert_close(loc.entropy_bits, torch.full((3,), math.log2(4 * math.pi)))
    area = loc.effective_area_km2.double()
    torch.testing.assert_close(area, torch.full((3,), 4 * math.pi * EARTH_RADIUS_KM**2, dtype=F64), rtol=1e-6, atol=0)
    assert 5.09e8 < area[0] < 5.11e8


@pytest.mark.parametrize("kappa", [2.0, 50.0])
def test_vmf_monte_carlo_matches_closed_form_entropy(kappa):
    # −H = E log f = ln κ − ln 4π − ln sinh κ + κ (coth κ − 1/κ)
    k = torch.tensor([[kappa]], dtype=F64)
    expected = math.log(kappa) - math.log(4 * math.pi) - (kappa + math.log(-math.expm1(-2 * kappa) / 2)) + kappa / math.tanh(kappa) - 1
    loc = localize(get_method("vmf"), _FixedVMF(PARIS[None], k), torch.zeros(2, 4, dtype=F64), 4000,
                   generator=torch.Generator().manual_seed(0))
    sd = loc.sample_logp.std(dim=1) / math.sqrt(4000)
    assert ((loc.neg_entropy_nats - expected).abs() < 5 * sd).all()
    torch.testing.assert_close(loc.effective_area_km2, torch.exp(-loc.neg_entropy_nats) * EARTH_RADIUS_KM**2)


def test_hdr_rank_definition_and_calibration():
    sample = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]], dtype=F64)
    torch.testing.assert_close(hdr_rank(torch.tensor([1.5, 4.0], dtype=F64), sample), torch.tensor([0.5, 1.0], dtype=F64))
    # truths drawn from the predicted distribution itself: ranks ~ U[0, 1], coverage(p) ≈ p
    method, model = get_method("vmf"), _FixedVMF(PARIS[None], torch.tensor([[8.0]], dtype=F64))
    g = torch.Generator().manual_seed(1)
    cond = torch.zeros(600, 4, dtype=F64)
    truth = method.sample(model, cond, 1, generator=g)[:, 0]
    loc = localize(method, model, cond, 200, x_true=truth, generator=g)
    assert loc.true_logp.shape == (600,) and loc.hdr_rank.shape == (600,)
    for p in (0.1, 0.5, 0.9):
        assert abs((loc.hdr_rank <= p).double().mean().item() - p) < 0.06
    # an over-confident model (κ too large) puts the truth in low-density regions: ranks near 1
    sharp = localize(method, _FixedVMF(PARIS[None], torch.tensor([[80.0]], dtype=F64)), cond[:100], 200,
                     x_true=truth[:100], generator=g)
    assert (sharp.hdr_rank <= 0.5).double().mean() < 0.2


def test_summary_helpers_and_validation():
    lp = torch.tensor([[-1.0, -3.0], [2.0, 4.0]], dtype=F64)
    torch.testing.assert_close(neg_entropy_nats(lp), torch.tensor([-2.0, 3.0], dtype=F64))
    torch.testing.assert_close(entropy_bits(lp), torch.tensor([2.0, -3.0], dtype=F64) / math.log(2))
    torch.testing.assert_close(effective_area_km2(lp), torch.exp(torch.tensor([2.0, -3.0], dtype=F64)) * EARTH_RADIUS_KM**2)
    d = localizability_from_logp(lp.float())
    assert set(d) == {"neg_entropy_nats", "entropy_bits", "effective_area_km2"}
    assert all(v.dtype == F64 and v.device.type == "cpu" for v in d.values())
    with pytest.raises(ValueError, match=r"shape \(B, N>0\)"):
        neg_entropy_nats(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        hdr_rank(torch.zeros(3), lp)
    with pytest.raises(ValueError, match="n_samples"):
        localize(get_method("uniform"), None, torch.zeros(1, 2), 0)


def test_localize_rfm_batches_records_times_samples():
    torch.manual_seed(0)
    net = GeoAdaLNMLP(NetworkConfig(dim=16, depth=1, cond_dim=4))
    torch.nn.init.zeros_(net.time_mlp[2].weight)  # smooth in γ: few ODE steps (see test_likelihood)
    torch.nn.init.zeros_(net.time_mlp[2].bias)
    method = get_method("rfm")
    cond = torch.randn(5, 4)
    truth = latlon_to_xyz(torch.tensor([[10.0, 20.0]])).expand(5, 3)
    calls = []
    orig = method.log_likelihood
    method.log_likelihood = lambda *a, **k: calls.append(a[1].shape[0]) or orig(*a, **k)
    loc = localize(method, net, cond, 6, x_true=truth, steps=4, batch_size=12, generator=torch.Generator().manual_seed(0))
    assert calls == [12, 12, 6, 5]  # 2 records × 6 samples per chunk, then the truths
    assert loc.samples.shape == (5, 6, 3) and torch.isfinite(loc.sample_logp).all()
    assert ((loc.hdr_rank >= 0) & (loc.hdr_rank <= 1)).all()


class _GaussianFlow(torch.nn.Module):
    """Exact flow-matching field carrying N(0, I) to N(m, s²I) along straight lines:
    y_γ = (1 − γ + γs) ε + γ m, so v = (s − 1)(y − γm)/(1 − γ + γs) + m (Euler is exact)."""

    def __init__(self, m, s):
        super().__init__()
        self.m, self.s = m, s

    def forward(self, y, gamma, cond):
        g = gamma.reshape(-1, 1)
        return (self.s - 1) * (y - g * self.m) / (1 - g + g * self.s) + self.m


def test_r3_models_are_scored_on_their_own_unprojected_draws():
    """−H of an R³ model is the differential entropy of its R³ density (closed form for a Gaussian),
    and truths drawn from that density get uniform HDR ranks; scoring the projected draws would be
    off by ≈ 0.5 nats and skew the ranks. The effective area is undefined for R³ densities."""
    m, s = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64), 0.3
    method, model = get_method("flow"), _GaussianFlow(m, s)
    g = torch.Generator().manual_seed(0)
    cond = torch.zeros(400, 4, dtype=F64)
    truth = m + s * torch.randn(400, 3, dtype=F64, generator=g)  # draws of the model's own density
    loc = localize(method, model, cond, 64, x_true=truth, steps=8, batch_size=8192, rtol=1e-7, atol=1e-7, generator=g)
    neg_h = -1.5 * math.log(2 * math.pi * math.e * s * s)
    assert loc.neg_entropy_nats.mean().item() == pytest.approx(neg_h, abs=0.03)  # s.e. ≈ 1.22/√25600
    gauss = -1.5 * math.log(2 * math.pi * s * s) - ((truth - m) ** 2).sum(-1) / (2 * s * s)
    torch.testing.assert_close(loc.true_logp, gauss, rtol=0, atol=1e-5)
    for p in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert abs((loc.hdr_rank <= p).double().mean().item() - p) < 0.06
    assert torch.isnan(loc.effective_area_km2).all()
    torch.testing.assert_close(loc.samples.norm(dim=-1), torch.ones(400, 64, dtype=F64))
    # scoring the projected draws instead (the old way) overstates −H by ≈ 0.5 nats here
    lp_proj = method.log_likelihood(model, loc.samples[:20].reshape(-1, 3), cond[:20].repeat_interleave(64, 0))
    assert lp_proj.mean().item() > neg_h + 0.3

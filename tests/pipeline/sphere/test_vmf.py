"""vMF densities, mixture, Wood sampler and mode (docs/methods.md#vmf), against reference density values."""

import math

import pytest
import torch

from geopipe.pipeline.sphere.geometry import LOG_UNIFORM_SPHERE, fibonacci_sphere, latlon_to_xyz, project
from geopipe.pipeline.sphere.vmf import (
    sample_vmf,
    sample_vmf_mixture,
    vmf_log_density,
    vmf_mixture_log_density,
    vmf_mixture_mode,
    vmf_mixture_nll,
)

F64 = torch.float64
PARIS = latlon_to_xyz(torch.tensor([[48.8566, 2.3522]], dtype=F64))
NYC = latlon_to_xyz(torch.tensor([[40.7128, -74.0060]], dtype=F64))
EZ = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)


def test_vmf_oracle():
    k10 = torch.tensor(10.0, dtype=F64)
    assert vmf_log_density(PARIS, PARIS, k10).item() == pytest.approx(0.4647080096, abs=1e-9)
    assert vmf_log_density(NYC, PARIS, k10).item() == pytest.approx(-3.4470641242, abs=1e-9)
    assert vmf_log_density(PARIS, PARIS, torch.tensor(1000.0, dtype=F64)).item() == pytest.approx(5.0698781926, abs=1e-9)


def test_mixture_oracle():
    mu = torch.cat((PARIS, NYC, EZ))[None]
    kappa = torch.tensor([[10.0, 100.0, 1.0]], dtype=F64)
    w = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    assert vmf_mixture_nll(PARIS, mu, kappa, w).item() == pytest.approx(0.1929383536, abs=1e-9)


@pytest.mark.parametrize("kappa", [0.3, 5.0, 80.0])
def test_densities_integrate_to_one(kappa):
    pts = fibonacci_sphere(40000)
    k = torch.tensor(kappa, dtype=F64)
    mass = vmf_log_density(pts, PARIS, k).exp().mean() * 4 * math.pi
    assert mass.item() == pytest.approx(1.0, abs=2e-3)
    mu = torch.cat((PARIS, NYC, EZ))[None].expand(len(pts), 3, 3)
    kap = torch.tensor([kappa, 2 * kappa, 1.0], dtype=F64).expand(len(pts), 3)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64).expand(len(pts), 3)
    mass = vmf_mixture_log_density(pts, mu, kap, w).exp().mean() * 4 * math.pi
    assert mass.item() == pytest.approx(1.0, abs=2e-3)


def test_extreme_kappa_is_finite_and_tends_to_uniform():
    x = project(torch.randn(50, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    for k in (1e-7, 1e5):
        lp = vmf_log_density(x, PARIS, torch.tensor(k, dtype=F64))
        assert torch.isfinite(lp).all()
    tiny = vmf_log_density(x, PARIS, torch.tensor(1e-3, dtype=F64))
    torch.testing.assert_close(tiny, torch.full_like(tiny, LOG_UNIFORM_SPHERE), atol=2e-3, rtol=0)
    f32 = vmf_log_density(PARIS.float(), PARIS.float(), torch.tensor(1e6))
    assert torch.isfinite(f32).all()


@pytest.mark.parametrize("kappa", [0.5, 10.0, 1e4])
def test_wood_sampler_moments(kappa):
    n = 20000
    g = torch.Generator().manual_seed(3407)
    mu = PARIS.expand(n, 3)
    x = sample_vmf(mu, torch.full((n,), kappa, dtype=F64), generator=g)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(n, dtype=F64))
    w = x @ PARIS[0]
    mean_w = 1 / math.tanh(kappa) - 1 / kappa  # E⟨μ, x⟩ = coth κ − 1/κ on S²
    sd = w.std().item() / math.sqrt(n)
    assert abs(w.mean().item() - mean_w) < 5 * sd + 1e-12
    # the part orthogonal to μ is isotropic: its mean vanishes
    perp = x - w[:, None] * PARIS
    assert perp.mean(0).norm().item() < 5 * perp.norm(dim=-1).mean().item() / math.sqrt(n)


def test_wood_sampler_is_reproducible_and_keeps_dtype():
    mu = PARIS.float().expand(10, 3)
    k = torch.linspace(0.1, 100.0, 10)
    a = sample_vmf(mu, k, generator=torch.Generator().manual_seed(1))
    b = sample_vmf(mu, k, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.float32


def test_mixture_sampling_follows_weights():
    mu = torch.cat((PARIS, -PARIS, EZ))[None].expand(2, 3, 3)
    kappa = torch.full((2, 3), 200.0, dtype=F64)
    w = torch.tensor([[0.6, 0.3, 0.1], [0.0, 0.0, 1.0]], dtype=F64)
    x = sample_vmf_mixture(mu, kappa, w, 5000, generator=torch.Generator().manual_seed(2))
    assert x.shape == (2, 5000, 3)
    nearest = (x[0] @ mu[0].T).argmax(dim=-1)
    frac = torch.bincount(nearest, minlength=3).to(F64) / 5000
    torch.testing.assert_close(frac, w[0], atol=0.025, rtol=0)
    assert ((x[1] @ EZ[0]) > 0.9).all()


def test_mode_single_and_mixture():
    mu = torch.cat((PARIS, NYC))[None]
    # the heavier component is broad, the lighter one sharp: the sharp mean has the highest density
    kappa = torch.tensor([[1.0, 200.0]], dtype=F64)
    w = torch.tensor([[0.7, 0.3]], dtype=F64)
    torch.testing.assert_close(vmf_mixture_mode(mu, kappa, w), NYC)
    torch.testing.assert_close(vmf_mixture_mode(mu, torch.tensor([[50.0, 50.0]], dtype=F64), w), PARIS)
    torch.testing.assert_close(vmf_mixture_mode(NYC[None], kappa[:, :1], torch.ones(1, 1, dtype=F64)), NYC)

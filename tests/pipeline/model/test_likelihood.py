"""Exact ODE log-likelihoods (docs/methods.md#likelihood) against closed forms, a sign oracle and invariants."""

import math

import pytest
import torch

from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.likelihood import (
    diffusion_log_likelihood,
    euclidean_log_likelihood,
    field_jacobian,
    sphere_divergence,
    sphere_log_likelihood,
)
from geopipe.pipeline.model.network import GeoAdaLNMLP, NetworkConfig
from geopipe.pipeline.model.schedules import LinearSchedule, SigmoidSchedule
from geopipe.pipeline.sphere.geometry import LOG_UNIFORM_SPHERE, fibonacci_sphere, latlon_to_xyz, project

F64 = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-9)
PARIS = latlon_to_xyz(torch.tensor([[48.8566, 2.3522]], dtype=F64))


def _points(n, seed=0, dtype=F64):
    return project(torch.randn(n, 3, dtype=dtype, generator=torch.Generator().manual_seed(seed)))


def test_sign_oracle_gaussian_base():
    lp = euclidean_log_likelihood(lambda y, g: 0.5 * y, PARIS, SigmoidSchedule(), **TIGHT)
    assert lp.item() == pytest.approx(-4.4407553, abs=1e-7)
    assert (lp / (3 * math.log(2))).item() == pytest.approx(-2.1355519, abs=1e-7)
    lp32 = euclidean_log_likelihood(lambda y, g: 0.5 * y, PARIS.float(), SigmoidSchedule())
    assert lp32.dtype == torch.float32 and lp32.item() == pytest.approx(-4.4407553, abs=1e-4)


M = torch.tensor([0.3, -0.2, 0.5], dtype=F64)
S = 0.5


def _log_normal(x):  # log N(x; M, S² I)
    return -0.5 * ((x - M) ** 2).sum(-1) / S**2 - 3 * math.log(S) - 1.5 * math.log(2 * math.pi)


def test_euclidean_flow_with_exact_gaussian_field():
    # optimal γ-velocity of y = γ x + (1−γ) ε for data N(M, S² I): E[x − ε | y]
    def field(y, g):
        g = g[:, None]
        var = g**2 * S**2 + (1 - g) ** 2
        return M + (g * S**2 - (1 - g)) / var * (y - g * M)

    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(3)) * 0.7
    lp = euclidean_log_likelihood(field, x, SigmoidSchedule(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp, _log_normal(x), rtol=0, atol=1e-6)


def test_diffusion_vp_flow_with_exact_gaussian_eps():
    # exact ε̂ of the VP process x_γ = √γ x + √(1−γ) ε for data N(M, S² I) (the exact VP field)
    def eps(y, g):
        g = g[:, None]
        return (1 - g).sqrt() * (y - g.sqrt() * M) / (g * S**2 + 1 - g)

    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(4)) * 0.7
    lp = diffusion_log_likelihood(eps, x, SigmoidSchedule(), rtol=1e-8, atol=1e-8)
    # the VP marginal at γ(1) = 1e-9 is N(√γ M, …), not exactly the N(0, I) base: O(√1e-9) error
    torch.testing.assert_close(lp, _log_normal(x), rtol=0, atol=1e-4)
    # the reference field (missing 1/√(1−γ)) would not reproduce it: the factor matters here
    bad = diffusion_log_likelihood(lambda y, g: eps(y, g) * (1 - g[:, None]).sqrt(), x, SigmoidSchedule(), rtol=1e-8, atol=1e-8)
    assert (bad - _log_normal(x)).abs().max() > 0.1


def _neg_log_snr(g: float) -> float:
    return math.log1p(-g) - math.log(g)


def test_diffusion_imperfect_eps_is_exact_and_not_stiff():
    # A trained ε̂ is never the ideal one; ε̂ = a·y (J = aI ≠ I at γ → 0) made the scheduler-time
    # field stiff (β ≈ 1/(1 − t)): thousands of solver steps or a step-size underflow, and the clamp
    # γ ≥ 1e-9 just before t = 1 relaxed x for one more e-fold (≈ 1 nat off here). The ODE is linear,
    # so the answer is closed-form: with τ = ln((1−γ)/γ), σ² = sigmoid(τ), w = √(1 + e^−τ),
    # x(end) = e^k x and ℓ = D k, k = ½[a (F(τ1) − F(τ0)) − (softplus(τ1) − softplus(τ0))],
    # F(τ) = ∫ σ dτ = ln((w + 1)/(w − 1)).
    a, sched = 0.3, SigmoidSchedule()
    tau0 = _neg_log_snr(float(sched.gamma(torch.tensor(1e-5, dtype=F64))))
    tau1 = _neg_log_snr(float(sched.gamma(torch.tensor(1.0, dtype=F64))))

    def big_f(t):
        w = math.sqrt(1 + math.exp(-t))
        return math.log((w + 1) / (w - 1))

    def softplus(t):
        return math.log1p(math.exp(t))

    k = 0.5 * (a * (big_f(tau1) - big_f(tau0)) - (softplus(tau1) - softplus(tau0)))
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    expected = -0.5 * math.exp(2 * k) * (x * x).sum(-1) - 1.5 * math.log(2 * math.pi) + 3 * k

    calls = []

    def eps(y, g):
        calls.append(1)
        return a * y

    lp = diffusion_log_likelihood(eps, x, sched, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-6)
    assert len(calls) < 1000, f"{len(calls)} field evaluations: the diffusion likelihood ODE is stiff again"


@pytest.mark.parametrize("schedule", [SigmoidSchedule(), LinearSchedule()], ids=["sigmoid", "linear"])
def test_divergence_free_rotation_gives_uniform(schedule):
    omega = torch.tensor([0.4, -2.0, 1.1], dtype=F64)
    # time-dependent rigid rotation plus a radial component (removed by the tangent projection)
    field = lambda y, g: g[:, None] * torch.linalg.cross(omega.expand_as(y), y) + 3.0 * y
    lp = sphere_log_likelihood(field, _points(20), schedule, **TIGHT)
    torch.testing.assert_close(lp, torch.full_like(lp, LOG_UNIFORM_SPHERE), rtol=0, atol=1e-10)


def test_surface_divergence_sanity():
    x = _points(10, seed=5)
    a = torch.tensor([0.3, -1.2, 0.7], dtype=F64)
    omega = torch.tensor([1.0, 0.5, -0.2], dtype=F64)
    _, div_a = sphere_divergence(lambda y: a.expand_as(y), x)
    torch.testing.assert_close(div_a, -2 * x @ a)
    _, div_x = sphere_divergence(lambda y: y, x)
    torch.testing.assert_close(div_x, torch.zeros(10, dtype=F64))
    _, div_rot = sphere_divergence(lambda y: torch.linalg.cross(omega.expand_as(y), y), x)
    torch.testing.assert_close(div_rot, torch.zeros(10, dtype=F64))


def test_constant_field_closed_form_on_sphere():
    # ψ̃ = a: in γ-time the point slides along great circles towards a with dθ/dγ = −k sin θ,
    # tan(θ/2) = u_d e^{−k(γ−1)}, and ℓ = ∫_1^{γ_e} −2k cos θ dγ = −2k [G(γ_e) − G(1)],
    # G(γ) = γ + ln(1 + u²)/k (k = ‖a‖, θ the angle to a).
    k = 1.3
    a = torch.tensor([0.0, 0.6, 0.8], dtype=F64) * k
    x = _points(12, seed=6)
    s = SigmoidSchedule()
    g_end = s.gamma(torch.tensor(1.0, dtype=F64)).item()
    u_d = torch.tan(torch.arccos(x @ a / k) / 2)

    def G(g):
        return g + torch.log1p((u_d * math.exp(-k * (g - 1))) ** 2) / k

    expected = LOG_UNIFORM_SPHERE - 2 * k * (G(g_end) - G(1.0))
    lp = sphere_log_likelihood(lambda y, g: a.expand_as(y), x, s, **TIGHT)
    torch.testing.assert_close(lp, expected, rtol=0, atol=1e-7)


def test_reference_ambient_option_uses_ambient_trace():
    # ψ̃ = c x: Riemannian divergence 0, ambient divergence 3c (reference_ambient reproduces the reference)
    x, c = _points(5), 0.4
    s = SigmoidSchedule()
    riem = sphere_log_likelihood(lambda y, g: c * y, x, s, **TIGHT)
    amb = sphere_log_likelihood(lambda y, g: c * y, x, s, reference_ambient=True, **TIGHT)
    torch.testing.assert_close(riem, torch.full_like(riem, LOG_UNIFORM_SPHERE))
    torch.testing.assert_close(amb, torch.full_like(amb, LOG_UNIFORM_SPHERE - 3 * c * (1 - 1e-9)))


def test_hutchinson_exact_for_diagonal_and_unbiased():
    s = LinearSchedule()
    diag = torch.diag(torch.tensor([0.3, -0.5, 0.2], dtype=F64))
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(7))
    exact = euclidean_log_likelihood(lambda y, g: y @ diag.T, x, s, **TIGHT)
    hutch = euclidean_log_likelihood(lambda y, g: y @ diag.T, x, s, hutchinson=True, generator=torch.Generator().manual_seed(0), **TIGHT)
    torch.testing.assert_close(hutch, exact)
    full = torch.tensor([[0.1, 0.8, -0.3], [0.2, -0.2, 0.5], [-0.6, 0.1, 0.3]], dtype=F64)
    xr = PARIS.expand(4000, 3)
    exact = euclidean_log_likelihood(lambda y, g: y @ full.T, xr[:1], s, **TIGHT)
    hutch = euclidean_log_likelihood(lambda y, g: y @ full.T, xr, s, hutchinson=True, generator=torch.Generator().manual_seed(0))
    assert hutch.std() > 0.1 and abs(hutch.mean() - exact) < 4 * hutch.std() / math.sqrt(4000)


def _smooth_net(seed=0, dtype=torch.float32, dim=32, depth=2):
    """Tiny GeoAdaLNMLP whose time-MLP output starts at zero.

    The time features contain cos(1000γ): a random-init network oscillates ~160 times in γ and
    costs dopri5 ~10x more field evaluations. Zeroing the last time layer keeps these tests fast;
    training still learns whatever γ-dependence it needs.
    """
    torch.manual_seed(seed)
    net = GeoAdaLNMLP(NetworkConfig(dim=dim, depth=depth, cond_dim=4)).to(dtype)
    torch.nn.init.zeros_(net.time_mlp[2].weight)
    torch.nn.init.zeros_(net.time_mlp[2].bias)
    return net


def test_batched_jacobian_matches_per_record_autograd():
    net = _smooth_net(dtype=F64)
    with torch.no_grad():  # make the zero-initialised output layers non-trivial
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, g, c = _points(5), torch.rand(5, dtype=F64), torch.randn(5, 4, dtype=F64)
    val, jac = field_jacobian(lambda y: net(y, g, c), x)
    for b in range(5):
        ref = torch.autograd.functional.jacobian(lambda y: net(y[None], g[b : b + 1], c[b : b + 1])[0], x[b])
        torch.testing.assert_close(jac[b], ref)
    torch.testing.assert_close(val, net(x, g, c).detach())
    assert jac.abs().max() > 1e-3


def test_runs_under_no_grad_and_inference_mode():
    net = _smooth_net(dtype=F64)
    method = get_method("rfm")
    x, c = _points(3), torch.randn(3, 4, dtype=F64)
    ref = method.log_likelihood(net, x, c)
    with torch.no_grad():
        assert torch.equal(method.log_likelihood(net, x, c), ref)
    with torch.inference_mode():
        xi, ci = x.clone(), c.clone()
        assert torch.equal(method.log_likelihood(net, xi, ci), ref)
    assert not ref.requires_grad


def _train_rfm(steps=80):
    """A tiny RFM model trained briefly on a two-cluster conditional toy dataset."""
    method = get_method("rfm")
    net = _smooth_net(dim=16, depth=1)
    g = torch.Generator().manual_seed(0)
    centers = latlon_to_xyz(torch.tensor([[45.0, 10.0], [-20.0, 130.0]]))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        lab = torch.randint(0, 2, (256,), generator=g)
        x = project(centers[lab] + 0.5 * torch.randn(256, 3, generator=g))
        cond = torch.nn.functional.one_hot(lab, 4).float()
        loss = method.loss(net, x, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return method, net


def test_trained_sphere_density_integrates_to_one():
    method, net = _train_rfm()
    n = 10000
    pts = fibonacci_sphere(n, dtype=torch.float32)  # equal-area cells of 4π/n sr
    cond = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(n, 4)
    dens = method.log_likelihood(net, pts, cond, rtol=1e-4, atol=1e-4).double().exp()
    assert dens.max() / dens.min() > 20  # far from uniform, so the check has teeth
    assert (dens.mean() * 4 * math.pi).item() == pytest.approx(1.0, abs=0.03)
    # the reference's ambient divergence is not a density on S²: here it integrates to ~2
    amb = method.log_likelihood(net, pts, cond, rtol=1e-4, atol=1e-4, reference_ambient=True).double().exp()
    assert abs((amb.mean() * 4 * math.pi).item() - 1.0) > 0.2

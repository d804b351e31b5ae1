"""Samplers (docs/methods.md#samplers) and classifier-free guidance (docs/methods.md#guidance): single-step oracle values
of the reference implementation, orders of convergence."""

import math

import pytest
import torch

from geopipe.pipeline.model.guidance import cfg_combine, guided_field
from geopipe.pipeline.model.samplers import SAMPLERS, ddim_sample, ddim_step, get_sampler, riemann_euler_step
from geopipe.pipeline.model.schedules import LinearSchedule, SigmoidSchedule
from geopipe.pipeline.sphere.geometry import latlon_to_xyz, project

F64 = torch.float64
PARIS = latlon_to_xyz(torch.tensor([[48.8566, 2.3522]], dtype=F64))


def test_ddim_step_oracle():
    s = SigmoidSchedule()
    g_now, g_next = s.gamma(torch.tensor(0.5, dtype=F64)), s.gamma(torch.tensor(0.25, dtype=F64))
    x = torch.tensor([[0.5, -1.2, 0.3]], dtype=F64)
    eps = torch.tensor([[0.2, -0.9, 0.1]], dtype=F64)
    x_next, x0 = ddim_step(x, eps, g_now, g_next)
    torch.testing.assert_close(x0, torch.tensor([[0.4589579935, -0.9432623830, 0.2829098819]], dtype=F64), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(x_next, torch.tensor([[0.4771011586, -1.0308623707, 0.2916978576]], dtype=F64), rtol=1e-8, atol=1e-9)


def test_ddim_clamps_x0_to_cube_and_returns_x0_at_last_step():
    x = torch.tensor([[0.0, 0.0, 0.0]], dtype=F64)
    out, x0 = ddim_step(x, torch.tensor([[50.0, -50.0, 0.0]], dtype=F64), 0.5, 0.9)
    assert x0.tolist() == [[-1.0, 1.0, 0.0]]
    # one step from the noise end: the result is the clamped x̂_0 of that single evaluation
    x = torch.tensor([[0.3, -0.2, 2.0]], dtype=F64)
    res = ddim_sample(lambda y, g: torch.zeros_like(y), x, SigmoidSchedule(), 1)
    assert torch.equal(res, (x / math.sqrt(1e-9)).clamp(-1, 1))


def test_ddim_with_exact_eps_recovers_point_mass():
    # data = δ_m: the ideal ε̂(y, γ) = (y − √γ m)/√(1−γ); DDIM must land exactly on m
    m = torch.tensor([[0.2, -0.5, 0.7]], dtype=F64)
    field = lambda y, g: (y - g.sqrt()[:, None] * m) / (1 - g).sqrt()[:, None]
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ddim_sample(field, x, SigmoidSchedule(), 8), m.expand(5, 3), rtol=0, atol=1e-12)


def test_riemann_euler_step_oracle():
    out = riemann_euler_step(PARIS, torch.tensor([[0.3, -0.2, 0.1]], dtype=F64), 0.1)
    torch.testing.assert_close(out, torch.tensor([[0.6692895030, 0.0068190503, 0.7429704313]], dtype=F64), rtol=1e-8, atol=1e-9)


def test_cfg_oracle():
    out = cfg_combine(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5, 0.5]), 2.0)
    assert out.tolist() == [2.0, 5.0, 8.0]


class _Recorder(torch.nn.Module):
    """ψ(y, γ, c) = y·γ + c[:, :3]; records the batch of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, y, gamma, cond):
        self.calls.append(cond.clone())
        return y * gamma[:, None] + cond[:, :3]


def test_guided_field_one_call_and_skips_uncond_at_zero():
    model = _Recorder()
    cond = torch.randn(4, 5, dtype=F64)
    y, g = torch.randn(4, 3, dtype=F64), torch.rand(4, dtype=F64)
    out0 = guided_field(model, cond, 0.0)(y, g)
    assert len(model.calls) == 1 and model.calls[0].shape == (4, 5)
    torch.testing.assert_close(out0, y * g[:, None] + cond[:, :3])
    model.calls.clear()
    out2 = guided_field(model, cond, 2.0)(y, g)
    assert len(model.calls) == 1 and model.calls[0].shape == (8, 5)
    assert torch.equal(model.calls[0][4:], torch.zeros(4, 5, dtype=F64))
    torch.testing.assert_close(out2, cfg_combine(y * g[:, None] + cond[:, :3], y * g[:, None], 2.0))


def _rotation(omega, x0, angle_scale):
    """Closed-form solution of dx/dγ = ω × x after Δγ = angle_scale (Rodrigues)."""
    k = omega / omega.norm()
    th = omega.norm() * angle_scale
    kx = torch.linalg.cross(k.expand_as(x0), x0)
    return x0 * math.cos(th) + kx * math.sin(th) + k * (x0 @ k)[:, None] * (1 - math.cos(th))


@pytest.mark.parametrize("schedule", [LinearSchedule(), SigmoidSchedule()], ids=["linear", "sigmoid"])
@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("riemann_euler", 1), ("riemann_exp", 1), ("riemann_heun", 2)])
def test_order_of_convergence_on_rigid_rotation(name, order, schedule):
    omega = torch.tensor([0.6, -1.1, 1.7], dtype=F64)
    field = lambda y, g: torch.linalg.cross(omega.expand_as(y), y)
    x0 = project(torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(1)))
    _, g_end = schedule.gamma(torch.tensor([1.0, 0.0], dtype=F64)).tolist()
    exact = _rotation(omega, x0, g_end - schedule.gamma(torch.tensor(1.0, dtype=F64)).item())
    sampler = get_sampler(name)
    errors = [(sampler(field, x0, schedule, n) - exact).norm(dim=-1).max().item() for n in (64, 128, 256)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < 0.05
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)


def test_samplers_keep_dtype_no_grad_and_eval_count():
    lin = torch.nn.Linear(3, 3)
    counter = {"n": 0}

    def field(y, g):
        counter["n"] += 1
        return lin(y)

    x = project(torch.randn(7, 3))
    for name, spec in SAMPLERS.items():
        counter["n"] = 0
        out = spec(field, x, SigmoidSchedule(), 5)
        assert out.dtype == torch.float32 and not out.requires_grad and out.shape == (7, 3)
        assert counter["n"] == 5 * spec.evals_per_step, name


def test_sampler_registry_errors():
    with pytest.raises(ValueError, match=r"unknown sampler 'eulr'; choose one of \['ddim'"):
        get_sampler("eulr")
    with pytest.raises(ValueError, match=r"'euler' is for r3 .*choose one of \['riemann_euler'"):
        get_sampler("euler", space="sphere", prediction="velocity")
    with pytest.raises(ValueError, match=r"'riemann_euler' is for sphere"):
        get_sampler("riemann_euler", space="r3")
    with pytest.raises(ValueError, match=r"'ddim' is for r3 eps"):
        get_sampler("ddim", space="r3", prediction="velocity")
    with pytest.raises(ValueError, match="steps must be"):
        SAMPLERS["euler"](lambda y, g: y, torch.zeros(1, 3), LinearSchedule(), 0)

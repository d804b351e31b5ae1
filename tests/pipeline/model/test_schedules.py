"""Schedules against the reference implementation's oracle values (the skewed sigmoid and its
sampling grid) and autograd derivatives."""

import pytest
import torch

from geopipe.pipeline.model.schedules import (
    CosineSchedule,
    CosineSimpleSchedule,
    LinearSchedule,
    SigmoidSchedule,
    make_schedule,
    schedule_from_dict,
    schedule_to_dict,
    time_grid,
)

T = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)


def test_skewed_sigmoid_oracle():
    s = SigmoidSchedule()
    assert s.gamma(T).tolist() == pytest.approx([1.0, 0.9894123333, 0.8756998418, 0.3468820049, 1e-9], abs=1e-10)
    assert s.dgamma(T).tolist() == pytest.approx(
        [-0.0095645319, -0.1141814787, -1.1032642549, -2.4694003395, -0.4747127517], abs=1e-10
    )
    assert s.alpha(T).tolist() == pytest.approx([0.009565, 0.115403, 1.259864, 7.118828, 474238.5], rel=1e-6, abs=1e-6)


def test_standard_sigmoid_and_cosine_simple_oracles():
    s = SigmoidSchedule(-3.0, 3.0, 0.9)
    assert s.gamma(T).tolist() == pytest.approx([1, 0.8663702876, 0.5, 0.1336297124, 1e-9], abs=1e-10)
    assert s.dgamma(T).tolist() == pytest.approx(
        [-0.2381296742, -0.9567775276, -1.7899790220, -0.9567775276, -0.2381296742], abs=1e-10
    )
    c = CosineSimpleSchedule().gamma(T).tolist()
    assert c[:4] == pytest.approx([0.9999999014, 0.8534006717, 0.4998822197, 0.1464327291], abs=1e-10)
    assert c[4] == pytest.approx(6.2e-9, abs=5e-11)


def test_sampling_grid_oracle():
    t, g = time_grid(SigmoidSchedule(), 8)
    expected = [1e-9, 0.105732089, 0.346882005, 0.663840851, 0.875699842, 0.961734529, 0.989412333, 0.997623495, 1.0]
    assert g.tolist() == pytest.approx(expected, abs=1e-9)
    assert t[0] == 1.0 and t[-1] == 0.0


@pytest.mark.parametrize(
    "schedule",
    [SigmoidSchedule(), SigmoidSchedule(-3, 3, 0.9), LinearSchedule(), CosineSchedule(), CosineSimpleSchedule()],
    ids=lambda s: s.name,
)
def test_analytic_derivative_matches_autograd(schedule):
    t = torch.linspace(0.01, 0.99, 37, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.gamma(t).sum(), t)
    assert torch.allclose(schedule.dgamma(t.detach()), grad, atol=1e-10)
    g = schedule.gamma(t.detach())
    assert (g[1:] <= g[:-1]).all(), "γ must decrease from data (t=0) to noise (t=1)"


def test_registry_and_round_trip():
    s = make_schedule("sigmoid", start=-3, end=3, tau=0.9)
    assert schedule_from_dict(schedule_to_dict(s)) == s
    with pytest.raises(ValueError, match="choose one of"):
        make_schedule("sigmod")
    with pytest.raises(ValueError, match="valid"):
        make_schedule("linear", tau=1.0)
    with pytest.raises(ValueError):
        time_grid(s, 0)

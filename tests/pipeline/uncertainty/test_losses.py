"""GGD losses against the uncertainty spec's oracles, the scipy gennorm cross-check and the
power-form property (fitted β ≈ 1 for Laplace, ≈ 2 for Gaussian residuals; linear form → 0.684)."""

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from geopipe.pipeline.uncertainty.losses import GGDLossConfig, bc_loss, bcc_loss, ggd_elementwise, ggd_loss, ggd_nll, log_ggd_variance, temp_comb_loss

ORACLES = json.loads((pathlib.Path(__file__).parents[1] / "eval" / "uncertainty_oracles.json").read_text())
T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
POWER, LINEAR = GGDLossConfig(), GGDLossConfig(residual_form="linear_official")


@pytest.mark.parametrize("case", ORACLES["A_ggd_nll_power"], ids=lambda c: f"r{c['r']}-a{c['alpha']}-b{c['beta']}")
def test_power_nll_oracles(case):
    r, a, b = T(case["r"]), T(case["alpha"]), T(case["beta"])
    assert float(ggd_nll(r, a, b)) == pytest.approx(case["nll_no_const"], rel=1e-9, abs=1e-12)
    assert float(ggd_nll(r, a, b, exact=True)) == pytest.approx(case["nll_full"], rel=1e-9)
    gennorm = pytest.importorskip("scipy.stats").gennorm
    assert -gennorm.logpdf(case["r"], case["beta"], scale=case["alpha"]) == pytest.approx(case["nll_full"], rel=1e-9)


@pytest.mark.parametrize("case", ORACLES["B_gengauss_official_elementwise"], ids=lambda c: f"mu{c['mean']}-t{c['target']}")
def test_elementwise_from_heads(case):
    args = (T(case["mean"]), T(case["h_one_over_alpha"]), T(case["h_beta"]), T(case["target"]))
    assert float(ggd_elementwise(*args, LINEAR)) == pytest.approx(case["linear_official"], rel=1e-9)
    assert float(ggd_elementwise(*args, POWER)) == pytest.approx(case["power_with_same_eps_and_clamp"], rel=1e-9)


def test_temp_comb_toy():
    d = ORACLES["B2_tempcomb_toy"]
    i = d["inputs"]
    args = (T(i["mu"]), T(i["h_one_over_alpha"]), T(i["h_beta"]))
    for form, cfg in (("linear_official", LINEAR), ("power", POWER)):
        assert float(ggd_loss(*args, T(i["target2"]), cfg)) == pytest.approx(d[form]["gengauss_mean"], rel=1e-9)
        assert float(temp_comb_loss(*args, T(i["target1"]), T(i["target2"]), cfg)) == pytest.approx(d[form]["total"], rel=1e-9)


def test_bc_and_bcc_toy():
    d = ORACLES["B3_bc_bcc_toy"]
    i = d["inputs"]
    e1, e2 = T(i["e1"]), T(i["e2"])
    o1 = (T(i["mu1"]), T(i["h_one_over_alpha1"]), T(i["h_beta1"]))
    o2 = (T(i["mu2"]), T(i["h_one_over_alpha2"]), T(i["h_beta2"]))
    for form, cfg in (("linear_official", LINEAR), ("power", POWER)):
        assert float(bc_loss(o1, e1, e2, cfg)) == pytest.approx(d[form]["L_BC"], rel=1e-9)
        assert float(bcc_loss(o1, o2, e1, e2, cfg)) == pytest.approx(d[form]["L_BCC"], rel=1e-9)


def test_zero_residual_power_form_has_finite_gradients():
    mu = T([0.5, 0.2]).requires_grad_()
    h_a, h_b = T([2.0, 3.0]).requires_grad_(), T([1.5, 0.7]).requires_grad_()
    ggd_loss(mu, h_a, h_b, T([0.5, 0.1])).backward()
    assert all(torch.isfinite(p.grad).all() for p in (mu, h_a, h_b))


def test_non_finite_loss_raises():
    with pytest.raises(FloatingPointError, match="non-finite"):
        ggd_loss(T([float("nan")]), T([1.0]), T([1.0]), T([0.0]))


@pytest.mark.parametrize("case", ORACLES["C_ggd_variance"], ids=lambda c: f"a{c['alpha']}-b{c['beta']}")
def test_log_variance(case):
    lv = float(log_ggd_variance(T(case["alpha"]), T(case["beta"])))
    assert lv == pytest.approx(case["log_var"], rel=1e-9)
    if case.get("var") is not None:
        assert math.exp(lv) == pytest.approx(case["var"], rel=1e-9)


def test_log_variance_beyond_float64():
    d = ORACLES["C_ggd_variance_beta_0.01_logspace"]
    assert float(log_ggd_variance(T(d["alpha"]), T(d["beta"]))) == pytest.approx(d["log_var"], rel=1e-9)


def _fit(res: np.ndarray, cfg: GGDLossConfig) -> tuple[float, float]:
    r = torch.from_numpy(res)
    a = torch.tensor(math.log(1.0 / np.abs(res).mean()), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure():
        opt.zero_grad()
        loss = ggd_loss(torch.zeros_like(r), a.exp().expand_as(r), b.exp().expand_as(r), r, cfg)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return 1.0 / (math.exp(a.item()) + cfg.eps_a), math.exp(b.item()) + cfg.eps_b


@pytest.mark.parametrize("dist,beta", [("laplace", 1.0), ("normal", 2.0)])
def test_power_form_recovers_the_shape_and_linear_form_collapses(dist, beta):
    rng = np.random.default_rng(0)
    res = getattr(rng, dist)(0.0, 0.02, size=200_000)
    alpha, b = _fit(res, POWER)
    assert b == pytest.approx(beta, rel=0.05)
    assert alpha == pytest.approx(0.02 if dist == "laplace" else 0.02 * math.sqrt(2), rel=0.05)
    _, b_lin = _fit(res, LINEAR)
    assert b_lin == pytest.approx(ORACLES["B4_linear_form_beta_star"]["beta_star"], rel=1e-3)

"""The calibrated retrieval density: closed forms (one vMF, the uniform floor), integrates to 1,
its own samples give uniform HDR ranks, the fit beats the old database-against-itself kernel on
held-out queries and is calibrated there, block-invariant Monte-Carlo columns."""

import math

import numpy as np
import pytest
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.calibration import calibration_table
from geopipe.pipeline.retrieval.calibrate import (
    PARAMETERS,
    CalibratedKernel,
    _mixture,
    calibrated_columns,
    calibrated_log_density,
    fit_calibrated,
)
from geopipe.pipeline.retrieval.density import fit_kernel, kernel_weights, log_density, neighbour_xyz
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, fibonacci_sphere, haversine_km, latlon_to_xyz, xyz_to_latlon
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture, vmf_mixture_log_density


def _kernel(**theta) -> CalibratedKernel:
    base = dict.fromkeys(PARAMETERS, 0.0)
    base.update(log_kappa=2 * math.log(EARTH_RADIUS_KM / 300.0), log_temperature=math.log(0.1), medium_log_ratio=2.0,
                wide_log_ratio=1.5, wide_logit=-1.0, log_kappa_broad=2 * math.log(EARTH_RADIUS_KM / 2000.0), broad_logit=-1.0,
                uniform_logit=-3.0)
    base.update(theta)
    return CalibratedKernel(theta=tuple(base[p] for p in PARAMETERS), feature_mean=(0.5, 0.2), feature_std=(0.2, 0.1),
                            val_nll=0.0, n_val=1)


def _neighbours():
    nb = np.array([[[10.0, 20.0], [11.0, 21.0], [-30.0, 100.0], [np.nan, np.nan]]])
    idx = np.array([[3, 8, 1, -1]])
    dist = np.array([[0.2, 0.3, 0.9, np.nan]])
    return nb, dist, idx


def test_one_sharp_component_is_the_vmf_closed_form_and_the_floor_is_uniform():
    nb, dist, idx = _neighbours()
    x = fibonacci_sphere(500)[None]
    off = -600.0  # shares of e^-600: far below every sharp density on the grid
    only_sharp = _kernel(medium_logit=off, wide_logit=off, broad_logit=off, uniform_logit=off, kappa_slope_d1=0.7)
    got = calibrated_log_density(only_sharp, x, nb, dist, idx)[0]
    z = (0.2 - 0.5) / 0.2
    kappa = math.exp(only_sharp.param("log_kappa") + 0.7 * z)
    w = kernel_weights(dist, idx, 0.1)
    mu = neighbour_xyz(nb)[0].expand(500, -1, -1)
    want = vmf_mixture_log_density(x[0], mu, torch.full((500, 4), kappa, dtype=torch.float64), w.expand(500, -1))
    assert torch.allclose(got, want, atol=1e-6)
    only_floor = _kernel(medium_logit=-200.0, wide_logit=-200.0, broad_logit=-200.0, uniform_logit=200.0)
    assert torch.allclose(calibrated_log_density(only_floor, x, nb, dist, idx), torch.full((1, 500), -math.log(4 * math.pi), dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("width_km", [150.0, 600.0])
def test_integrates_to_one(width_km):
    nb, dist, idx = _neighbours()
    grid = fibonacci_sphere(400_000)[None]
    fit = _kernel(log_kappa=2 * math.log(EARTH_RADIUS_KM / width_km), kappa_slope_gap=0.3, broad_slope_d1=0.5, medium_slope_gap=-0.4)
    logp = calibrated_log_density(fit, grid, nb, dist, idx)
    assert float(4 * math.pi / grid.shape[1] * logp.exp().sum()) == pytest.approx(1.0, abs=3e-3)


def test_own_samples_give_uniform_hdr_ranks():
    """Truths drawn from the density itself: hdr_rank ~ U(0, 1) — the sampler and the density agree."""
    rng = np.random.default_rng(0)
    q, k = 1500, 6
    centre = np.stack([rng.uniform(-60, 60, q), rng.uniform(-180, 180, q)], axis=1)
    nb = centre[:, None] + rng.normal(scale=2.0, size=(q, k, 2))
    dist = np.sort(rng.uniform(0.1, 1.0, (q, k)), axis=1)
    idx = np.tile(np.arange(k), (q, 1))
    fit = _kernel(log_kappa=2 * math.log(EARTH_RADIUS_KM / 40.0), kappa_slope_d1=-0.5, broad_slope_gap=0.4)
    mu, kappa, w = _mixture(fit, nb, dist, idx)
    truth = xyz_to_latlon(sample_vmf_mixture(mu, kappa, w, 1, generator=torch.Generator().manual_seed(5))[:, 0]).numpy()
    _, cols = calibrated_columns(fit, nb, dist, idx, truth, n_samples=400, seed=1)
    assert calibration_table(cols["hdr_rank"])["error"] < 0.03
    assert np.all(np.isfinite(cols["log_likelihood"])) and np.all(cols["effective_area_km2"] > 0)


def _world(n, rng):
    """Queries whose neighbour 0 is near the truth at a per-query scale (sharper when d₁ is small), else off by ~1000 km."""
    k = 8
    truth = np.stack([np.rad2deg(np.arcsin(rng.uniform(-0.9, 0.9, n))), rng.uniform(-180, 180, n)], axis=1)
    d1 = rng.uniform(0.1, 0.9, n)
    scale_km = np.where(rng.random(n) < 0.7, 5.0 + 150.0 * d1, 1500.0)
    dist = np.sort(np.concatenate([d1[:, None], d1[:, None] + rng.uniform(0.0, 0.5, (n, k - 1))], axis=1), axis=1)
    step = rng.normal(size=(n, k, 2)) * (scale_km[:, None, None] / 111.0)
    step[:, 1:] *= 4.0
    nb = truth[:, None] + step
    nb[..., 0] = np.clip(nb[..., 0], -89.0, 89.0)
    return truth, nb, dist, np.tile(np.arange(k), (n, 1))


def test_fit_on_held_out_queries_beats_the_old_kernel_and_is_calibrated():
    rng = np.random.default_rng(3)
    val, test = _world(1200, rng), _world(1500, rng)
    fit = fit_calibrated([val], max_iter=60)
    assert fit.n_val == 1200 and fit.param("kappa_slope_d1") < 0  # larger d₁ → broader kernel
    old = fit_kernel(*val[:2], val[2], val[3])
    truth, nb, dist, idx = test
    x = latlon_to_xyz(torch.from_numpy(truth))
    old_nll = float(-log_density(x, neighbour_xyz(nb), kernel_weights(dist, idx, old.temperature), old.kappa).mean())
    pred, cols = calibrated_columns(fit, nb, dist, idx, truth, n_samples=256)
    assert -cols["log_likelihood"].mean() < old_nll - 0.3
    assert calibration_table(cols["hdr_rank"])["error"] < 0.03
    assert pred.shape == (1500, 2)
    assert haversine_km(pred[:, None, 0], pred[:, None, 1], nb[..., 0], nb[..., 1]).min(axis=1).max() < 1e-6  # a neighbour's position


def test_columns_do_not_depend_on_how_queries_are_cut_into_blocks():
    rng = np.random.default_rng(1)
    truth, nb, dist, idx = _world(40, rng)
    fit = _kernel()
    whole = calibrated_columns(fit, nb, dist, idx, truth, n_samples=64, seed=7, group=8)
    parts = [calibrated_columns(fit, nb[a:a + 16], dist[a:a + 16], idx[a:a + 16], truth[a:a + 16], n_samples=64, seed=7, first=a,
                                group=8) for a in (0, 16, 32)]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in parts]))
    for name in whole[1]:
        np.testing.assert_array_equal(whole[1][name], np.concatenate([p[1][name] for p in parts]))
    with pytest.raises(ValueError, match="multiple of the sampling group"):
        calibrated_columns(fit, nb, dist, idx, truth, first=3, group=8)


def test_errors_are_one_line():
    nb, dist, idx = _neighbours()
    with pytest.raises(GeopipeError, match="no held-out query"):
        fit_calibrated([(np.full((1, 2), np.nan), nb, dist, idx)])
    with pytest.raises(GeopipeError, match="no neighbour"):
        calibrated_log_density(_kernel(), fibonacci_sphere(4)[None], nb, dist, np.full_like(idx, -1))

"""Retrieval kernel density: integrates to 1 on a Fibonacci grid, the fit prefers the right
width, localizability and HDR ranks are well-formed."""

import math

import numpy as np
import pytest
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.density import fit_kernel, kernel_localizability, kernel_mode, kernel_weights, log_density, neighbour_xyz
from geopipe.pipeline.sphere.geometry import fibonacci_sphere, latlon_to_xyz


def _neighbours():
    nb = np.array([[[10.0, 20.0], [11.0, 21.0], [-30.0, 100.0], [np.nan, np.nan]]])
    idx = np.array([[3, 8, 1, -1]])
    dist = np.array([[0.2, 0.3, 0.9, np.nan]])
    return nb, idx, dist


@pytest.mark.parametrize("temperature", [0.1, math.inf])
@pytest.mark.parametrize("kappa", [5.0, 200.0])
def test_integrates_to_one_on_fibonacci_grid(kappa, temperature):
    nb, idx, dist = _neighbours()
    w = kernel_weights(dist, idx, temperature)
    assert w[0, 3] == 0 and float(w.sum()) == pytest.approx(1.0)
    grid = fibonacci_sphere(200_000)
    mu = neighbour_xyz(nb).expand(grid.shape[0], -1, -1)
    logp = log_density(grid, mu, w.expand(grid.shape[0], -1), kappa)
    assert float(4 * math.pi / grid.shape[0] * logp.exp().sum()) == pytest.approx(1.0, abs=2e-3)


def test_fit_picks_the_width_of_the_scatter():
    rng = np.random.default_rng(0)
    n, k = 400, 5
    centre = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], axis=1)
    sd_deg = 0.5  # neighbours and truth scattered ≈ 55 km around a place
    nb = centre[:, None, :] + rng.normal(scale=sd_deg, size=(n, k, 2))
    truth = centre + rng.normal(scale=sd_deg, size=(n, 2))
    fit = fit_kernel(truth, nb, np.zeros((n, k)), np.zeros((n, k), dtype=np.int64))
    assert 20.0 < fit.width_km < 200.0 and fit.n_val == n and np.isfinite(fit.val_nll)
    mu = neighbour_xyz(nb[:3])
    w = kernel_weights(np.zeros((3, k)), np.zeros((3, k), dtype=np.int64), fit.temperature)
    mode = kernel_mode(mu, w, fit.kappa)
    assert mode.shape == (3, 2)
    loc = kernel_localizability(mu, w, fit.kappa, latlon_to_xyz(torch.from_numpy(truth[:3])), n_samples=64)
    assert set(loc) >= {"neg_entropy_nats", "effective_area_km2", "log_likelihood", "hdr_rank"}
    assert ((loc["hdr_rank"] >= 0) & (loc["hdr_rank"] <= 1)).all()


def test_no_neighbour_is_a_clear_error():
    with pytest.raises(GeopipeError, match="no neighbour"):
        kernel_weights(np.full((1, 2), np.nan), np.full((1, 2), -1), math.inf)

"""Regions of flow models from a KDE of their draws (no likelihood ODE solves), and the auto rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.infer.predictor import PredictOptions, region_density
from geopipe.pipeline.infer.regions import hdr_regions
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from geopipe.pipeline.sphere.vmf import sample_vmf

F64 = torch.float64


class _NoLikelihood:
    """A sphere method whose likelihood must not be called (the KDE path needs only draws)."""

    space = "sphere"
    name = "test"

    def log_likelihood(self, *a, **k):
        raise AssertionError("the KDE region evaluated the model's likelihood")


@pytest.mark.parametrize("kappa", [2000.0, 40.0])  # σ ≈ 142 km and ≈ 1,000 km
def test_kde_region_of_vmf_draws_is_close_to_the_exact_cap(kappa):
    mu = latlon_to_xyz(torch.tensor([[35.0, 139.0]], dtype=F64))
    x = sample_vmf(mu.expand(2000, 3), torch.full((2000,), kappa, dtype=F64), generator=torch.Generator().manual_seed(0))
    draws = x.reshape(1, 2000, 3)
    q = 0.9
    c = 1.0 + math.log1p(-q * -math.expm1(-2.0 * kappa)) / kappa
    cap = 2.0 * math.pi * EARTH_RADIUS_KM**2 * (1.0 - c)
    (r,) = hdr_regions(_NoLikelihood(), torch.nn.Linear(1, 1), torch.zeros(1, 4), q, samples=draws, density="kde")
    assert r.mass == pytest.approx(q, abs=0.01)  # of the KDE, on its grid
    assert 0.95 * cap < r.area_km2 < 1.35 * cap  # the kernel widens the density a little, never shrinks it much
    fresh = sample_vmf(mu.expand(20000, 3), torch.full((20000,), kappa, dtype=F64), generator=torch.Generator().manual_seed(1)).numpy()
    lat, lon = np.degrees(np.arcsin(fresh[:, 2])), np.degrees(np.arctan2(fresh[:, 1], fresh[:, 0]))
    assert shapely.contains_xy(r.geometry, lon, lat).mean() == pytest.approx(q, abs=0.04)  # true mass inside


def test_auto_density_is_exact_for_closed_forms_and_kde_for_flows():
    auto = PredictOptions(region=0.9)
    assert region_density(get_method("vmf"), auto) == "exact"
    assert region_density(get_method("vmf_mixture"), auto) == "exact"
    assert region_density(get_method("rfm"), auto) == "kde"
    assert region_density(get_method("rfm"), PredictOptions(region=0.9, region_density="exact")) == "exact"
    with pytest.raises(ConfigError, match="--region-density must be one of"):
        PredictOptions(region=0.9, region_density="grid")

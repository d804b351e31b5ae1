"""Highest-density regions as polygons (pipeline/infer/regions.py): vMF closed forms — mass of the
q-HDR cap, its area 2πR²(1 − c), log τ — near the antimeridian and the poles, mixtures, the batch helper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import shapely
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.infer.regions import LOG_KM2_PER_SR, RegionOptions, hdr_region, hdr_regions, spherical_area_km2
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.network import VMFParams
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture, vmf_log_density, vmf_mixture_log_density

F64 = torch.float64


def _vmf(lat: float, lon: float, kappa: float):
    mu = latlon_to_xyz(torch.tensor([lat, lon], dtype=F64))
    k = torch.tensor(kappa, dtype=F64)
    return mu, (lambda x: vmf_log_density(torch.from_numpy(x), mu, k).numpy())


def _draw(mu, kappa, weights, n: int, seed: int) -> np.ndarray:
    """(n, 3) draws of a vMF mixture: mu (M, 3), kappa (M,), weights (M,)."""
    g = torch.Generator().manual_seed(seed)
    return sample_vmf_mixture(mu.reshape(1, -1, 3), torch.as_tensor([kappa], dtype=F64).reshape(1, -1),
                              torch.as_tensor([weights], dtype=F64).reshape(1, -1), n, generator=g)[0].numpy()


def _mass_inside(geom, x: np.ndarray) -> float:
    """Fraction of the draws x (N, 3) inside the lon/lat polygon (Monte-Carlo mass, sd √(q(1−q)/N))."""
    lat, lon = np.degrees(np.arcsin(np.clip(x[:, 2], -1, 1))), np.degrees(np.arctan2(x[:, 1], x[:, 0]))
    return float(shapely.contains_xy(geom, lon, lat).mean())


def _cap(kappa: float, q: float) -> tuple[float, float]:
    """(cap area km², log density at its rim, nats/sr) of the vMF q-HDR: P(⟨μ, x⟩ ≥ c) = q."""
    c = 1.0 + math.log1p(-q * -math.expm1(-2.0 * kappa)) / kappa
    log_rim = math.log(kappa) - math.log(2 * math.pi * -math.expm1(-2.0 * kappa)) + kappa * (c - 1.0)
    return 2.0 * math.pi * EARTH_RADIUS_KM**2 * (1.0 - c), log_rim


# (lat, lon, κ): Paris at three scales (σ = R/√κ ≈ 10 km, 280 km, continental), the antimeridian, both poles
CASES = [(48.86, 2.35, 4e5), (48.86, 2.35, 500.0), (-15.0, 25.0, 3.0), (-16.0, 179.7, 800.0), (89.95, 30.0, 600.0),
         (-87.0, -120.0, 300.0)]


@pytest.mark.parametrize("lat,lon,kappa", CASES)
@pytest.mark.parametrize("q", [0.5, 0.9])
def test_vmf_hdr_holds_q_and_has_the_cap_area(lat, lon, kappa, q):
    mu, f = _vmf(lat, lon, kappa)
    r = hdr_region(f, q, samples=_draw(mu, kappa, 1.0, 1000, seed=1))
    area, log_rim = _cap(kappa, q)
    assert r.geometry.is_valid and r.geometry.geom_type in ("Polygon", "MultiPolygon")
    x0, y0, x1, y1 = r.geometry.bounds
    assert -180 <= x0 and x1 <= 180 and -90 <= y0 and y1 <= 90
    assert _mass_inside(r.geometry, _draw(mu, kappa, 1.0, 100_000, seed=2)) == pytest.approx(q, abs=0.01)
    assert r.area_km2 == pytest.approx(area, rel=0.02)
    assert r.mass == pytest.approx(q, abs=0.005)
    assert r.log_tau_sr == pytest.approx(log_rim, abs=0.02)
    assert r.log_tau_km2 == pytest.approx(r.log_tau_sr - 2 * math.log(EARTH_RADIUS_KM)) and LOG_KM2_PER_SR == 2 * math.log(EARTH_RADIUS_KM)
    assert shapely.from_wkb(r.wkb).equals(r.geometry) and r.wkb[0] == 1  # little-endian WKB
    assert r.evaluations <= 6 * 8 * 96 * 96


def test_antimeridian_region_is_cut_into_two_parts_and_polar_region_reaches_the_pole():
    mu, f = _vmf(-16.0, 179.7, 800.0)
    r = hdr_region(f, 0.9, samples=_draw(mu, 800.0, 1.0, 1000, seed=3))
    assert r.geometry.geom_type == "MultiPolygon" and len(r.geometry.geoms) == 2
    west, east = sorted(r.geometry.geoms, key=lambda p: p.bounds[0])
    assert west.bounds[0] == -180.0 and east.bounds[2] == 180.0  # RFC 7946: cut at the antimeridian
    assert spherical_area_km2(west) < spherical_area_km2(east)  # the centre, 179.7°E, lies in the part ending at 180°
    mu, f = _vmf(89.95, 30.0, 600.0)
    r = hdr_region(f, 0.9, samples=_draw(mu, 600.0, 1.0, 1000, seed=4))
    assert r.geometry.geom_type == "Polygon" and r.geometry.bounds[2:] == (180.0, 90.0) and r.geometry.bounds[0] == -180.0
    assert shapely.contains_xy(r.geometry, 0.0, 89.99)


def test_bimodal_mixture_gives_two_parts_one_per_mode():
    mu = latlon_to_xyz(torch.tensor([[48.86, 2.35], [40.71, -74.0]], dtype=F64))
    kappa, w = [2000.0, 300.0], [0.6, 0.4]

    def f(x):
        n = len(x)
        return vmf_mixture_log_density(torch.from_numpy(x), mu.expand(n, 2, 3), torch.tensor(kappa, dtype=F64).expand(n, 2),
                                       torch.tensor(w, dtype=F64).expand(n, 2)).numpy()

    r = hdr_region(f, 0.9, samples=_draw(mu, kappa, w, 1000, seed=5))
    assert r.geometry.geom_type == "MultiPolygon" and len(r.geometry.geoms) == 2
    for lat, lon in ((48.86, 2.35), (40.71, -74.0)):
        assert sum(bool(shapely.contains_xy(p, lon, lat)) for p in r.geometry.geoms) == 1
    assert _mass_inside(r.geometry, _draw(mu, kappa, w, 100_000, seed=6)) == pytest.approx(0.9, abs=0.01)


def test_without_samples_a_world_grid_locates_even_a_10_km_peak():
    mu, f = _vmf(-33.87, 151.21, 4e5)  # σ = R/√κ ≈ 10 km, far below the coarse grid's 2.5° nodes
    r = hdr_region(f, 0.9)
    area, _ = _cap(4e5, 0.9)
    assert r.area_km2 == pytest.approx(area, rel=0.02) and r.mass == pytest.approx(0.9, abs=0.005)
    assert shapely.contains_xy(r.geometry, 151.21, -33.87)


def test_tau_from_samples_is_the_sample_quantile():
    mu, f = _vmf(10.0, 10.0, 200.0)
    x = _draw(mu, 200.0, 1.0, 4000, seed=7)
    r = hdr_region(f, 0.8, samples=x, tau="samples")
    assert r.tau_from == "samples" and r.log_tau_sr == pytest.approx(float(np.quantile(f(x), 0.2)))
    assert r.mass == pytest.approx(0.8, abs=0.03)  # Monte-Carlo error √(0.16/4000) ≈ 0.006
    with pytest.raises(ConfigError, match="needs samples"):
        hdr_region(f, 0.8, tau="samples")


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.9", float("nan")])
def test_mass_must_lie_strictly_between_zero_and_one(bad):
    with pytest.raises(ConfigError, match=r"--region must be a probability mass in \(0, 1\)"):
        hdr_region(lambda x: np.zeros(len(x)), bad)


class _FixedVMF(torch.nn.Module):
    """vMF head stand-in: μ = cond[:, :3], κ = cond[:, 3]."""

    def forward(self, cond):
        return VMFParams(cond[:, None, :3], cond[:, 3:4], torch.ones(len(cond), 1, dtype=cond.dtype))


def test_batch_helper_gives_one_region_per_record_and_refuses_r3_methods():
    mu = latlon_to_xyz(torch.tensor([[48.86, 2.35], [-1.29, 36.82]], dtype=F64))
    cond = torch.cat([mu, torch.tensor([[1000.0], [50.0]], dtype=F64)], dim=1)
    regions = hdr_regions(get_method("vmf"), _FixedVMF(), cond, 0.9, options=RegionOptions(samples=500),
                          generator=torch.Generator().manual_seed(0))
    assert len(regions) == 2
    for r, (lat, lon), kappa in zip(regions, ((48.86, 2.35), (-1.29, 36.82)), (1000.0, 50.0)):
        assert shapely.contains_xy(r.geometry, lon, lat) and r.area_km2 == pytest.approx(_cap(kappa, 0.9)[0], rel=0.02)
    with pytest.raises(ConfigError, match="R³"):
        hdr_regions(get_method("flow"), _FixedVMF(), cond, 0.9)

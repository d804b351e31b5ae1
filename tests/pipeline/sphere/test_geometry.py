"""Sphere geometry against reference coordinate and exp/log values and float64 invariants."""

import math

import numpy as np
import pytest
import torch

from geopipe.pipeline.sphere.geometry import (
    EARTH_RADIUS_KM,
    LOG_UNIFORM_SPHERE,
    NonFiniteError,
    haversine_km,
    latlon_to_xyz,
    project,
    sphere_dist,
    sphere_exp,
    sphere_log,
    tangent_project,
    uniform_sphere,
    wrap_latlon,
    xyz_to_latlon,
)

PARIS = (48.8566, 2.3522)
NEW_YORK = (40.7128, -74.0060)


def _xyz(latlon):
    return latlon_to_xyz(torch.tensor(latlon, dtype=torch.float64))


def test_coordinate_oracles():
    assert _xyz(PARIS).tolist() == pytest.approx([0.6573914876, 0.0270034822, 0.7530652322], abs=1e-10)
    assert _xyz(NEW_YORK).tolist() == pytest.approx([0.2088536810, -0.7286473179, 0.6522677564], abs=1e-10)


def test_round_trip_float64():
    g = torch.Generator().manual_seed(0)
    lat = torch.rand(1000, generator=g, dtype=torch.float64) * 179.8 - 89.9
    lon = torch.rand(1000, generator=g, dtype=torch.float64) * 359.8 - 179.9
    ll = torch.stack((lat, lon), -1)
    back = xyz_to_latlon(latlon_to_xyz(ll))
    assert torch.allclose(back, ll, atol=1e-10, rtol=0)
    assert torch.allclose(latlon_to_xyz(ll).norm(dim=-1), torch.ones(1000, dtype=torch.float64), atol=1e-15)


def test_xyz_to_latlon_projects_and_refuses_non_finite():
    big = 7.5 * _xyz(PARIS)
    assert xyz_to_latlon(big).tolist() == pytest.approx(list(PARIS), abs=1e-9)
    bad = torch.tensor([[1.0, 0.0, 0.0], [float("nan"), 0.0, 1.0]])
    with pytest.raises(NonFiniteError, match="img_b"):
        xyz_to_latlon(bad, keys=["img_a", "img_b"])
    with pytest.raises(NonFiniteError):
        xyz_to_latlon(torch.zeros(1, 3))


def test_log_exp_oracle_and_round_trip():
    p, q = _xyz(PARIS), _xyz(NEW_YORK)
    v = sphere_log(p, q)
    assert v.tolist() == pytest.approx([-0.2210336977, -0.8605309604, 0.2238093018], abs=1e-9)
    assert v.norm().item() == pytest.approx(0.9162205154, abs=1e-9)
    assert (sphere_exp(p, v) - q).abs().max().item() < 1e-14
    assert abs(torch.dot(v, p).item()) < 1e-15  # tangent at p


def test_tangent_projection_and_projection_invariants():
    g = torch.Generator().manual_seed(1)
    x = uniform_sphere(500, generator=g, dtype=torch.float64)
    u = torch.randn(500, 3, generator=g, dtype=torch.float64)
    t = tangent_project(x, u)
    assert (t * x).sum(-1).abs().max().item() < 1e-14
    assert torch.allclose(tangent_project(x, t), t, atol=1e-15)
    assert torch.allclose(project(3 * u).norm(dim=-1), torch.ones(500, dtype=torch.float64), atol=1e-15)
    # exp/log round trip for random pairs away from antipodes
    y = uniform_sphere(500, generator=g, dtype=torch.float64)
    keep = (x * y).sum(-1) > -0.99
    x, y = x[keep], y[keep]
    assert (sphere_exp(x, sphere_log(x, y)) - y).abs().max().item() < 1e-10
    assert torch.allclose(sphere_log(x, y).norm(dim=-1), sphere_dist(x, y), atol=1e-12)


def test_uniform_sphere_is_uniform():
    x = uniform_sphere(200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # uniform on S² ⇔ z uniform on [−1, 1] (Archimedes)
    hist, _ = np.histogram(x[:, 2].numpy(), bins=10, range=(-1, 1))
    assert np.abs(hist / hist.mean() - 1).max() < 0.03
    assert LOG_UNIFORM_SPHERE == pytest.approx(-2.5310242470, abs=1e-10)


def test_haversine_oracle_and_radius():
    d = haversine_km(*PARIS, *NEW_YORK)
    assert d * 6371.0 / EARTH_RADIUS_KM == pytest.approx(5837.240904, abs=1e-5)
    p, q = _xyz(PARIS), _xyz(NEW_YORK)
    assert d == pytest.approx(EARTH_RADIUS_KM * math.acos(torch.dot(p, q).item()), rel=1e-12)
    assert haversine_km(10.0, 20.0, 10.0, 20.0) == 0.0


def test_wrap_latlon():
    lat, lon = wrap_latlon([95.0, -95.0, 45.0, 0.0], [10.0, 10.0, 190.0, -180.0])
    assert lat.tolist() == pytest.approx([85.0, -85.0, 45.0, 0.0])
    assert lon.tolist() == pytest.approx([-170.0, -170.0, -170.0, -180.0])


def test_coordinate_problem_is_the_one_input_rule():
    from geopipe.pipeline.sphere.geometry import LAT_LIMIT, LON_LIMIT, coordinate_problem
    from geopipe.schemas.rejects import REJECT_REASONS

    for ok in (0, -90, 90.0, 45.5):
        assert coordinate_problem(ok, "lat", LAT_LIMIT) is None
    assert coordinate_problem(-180.0, "lon", LON_LIMIT) is None and coordinate_problem(180, "lon", LON_LIMIT) is None
    cases = {None: "missing_coordinates", True: "invalid_coordinates", "12": "invalid_coordinates",
             math.nan: "invalid_coordinates", math.inf: "invalid_coordinates", 90.5: "invalid_coordinates"}
    for value, reason in cases.items():
        why, detail = coordinate_problem(value, "lat", LAT_LIMIT)
        assert why == reason and why in REJECT_REASONS and "lat" in detail
    assert coordinate_problem(-180.01, "lon", LON_LIMIT)[1] == "lon=-180.01 outside [-180, 180]"

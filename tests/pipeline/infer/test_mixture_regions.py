"""Narrow kernels of a vMF mixture drawn as discs of its HDR (pipeline/infer/mixture_regions.py): a
record whose mass sits in sub-km kernels at places hundreds of km apart (the hybrid's typical
record) gets a region that holds the asked mass — checked with independent draws — whose area is
the closed form's, one disc across the antimeridian included."""

from __future__ import annotations

import math

import numpy as np
import shapely
import torch

from geopipe.pipeline.infer.mixture_regions import narrow_sites, site_discs
from geopipe.pipeline.infer.regions import hdr_region
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture

F64 = torch.float64


def _mixture(n_sites: int = 25, width_km: float = 0.3, floor: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    ll = np.stack([rng.uniform(35, 60, n_sites - 1), rng.uniform(-10, 30, n_sites - 1)], 1)
    ll = np.vstack([ll, [[0.0, 179.9995]]])  # 55 m from the antimeridian: its disc crosses it
    mu = latlon_to_xyz(torch.as_tensor(ll, dtype=F64))
    kappa = torch.full((n_sites,), (EARTH_RADIUS_KM / width_km) ** 2, dtype=F64)
    w = torch.full((n_sites,), (1.0 - floor) / n_sites, dtype=F64)

    def log_density(x: np.ndarray) -> np.ndarray:
        xt = torch.as_tensor(x, dtype=F64)
        log_c = torch.log(kappa) - math.log(2 * math.pi) - torch.log(-torch.expm1(-2 * kappa))
        terms = torch.log(w) + log_c - kappa * 0.5 * ((xt[:, None, :] - mu[None]) ** 2).sum(-1)
        return torch.logsumexp(torch.cat([terms, torch.full((len(xt), 1), math.log(floor / (4 * math.pi)), dtype=F64)], 1), 1).numpy()

    def draw(n: int, s: int) -> np.ndarray:
        m = torch.cat([mu, torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)])[None]
        k = torch.cat([kappa, torch.tensor([1e-9], dtype=F64)])[None]
        return sample_vmf_mixture(m, k, torch.cat([w, torch.tensor([floor], dtype=F64)])[None], n, generator=torch.Generator().manual_seed(s))[0].numpy()

    return mu.numpy(), kappa.numpy(), torch.log(w).numpy(), log_density, draw


def _inside(geom, x: np.ndarray) -> float:
    lat, lon = np.degrees(np.arcsin(np.clip(x[:, 2], -1, 1))), np.degrees(np.arctan2(x[:, 1], x[:, 0]))
    return float((shapely.contains_xy(geom, lon, lat) | shapely.intersects_xy(geom, lon, lat)).mean())


def test_sub_km_kernels_far_apart_get_a_region_holding_the_asked_mass_with_the_closed_form_area():
    mu, kappa, log_w, log_density, draw = _mixture()
    sites = narrow_sites(mu, kappa, log_w)
    assert len(sites) == 25
    x = draw(4000, 1)
    r = hdr_region(log_density, 0.9, samples=x, tau="samples", sites=sites, mass_samples=draw(2000, 2))
    check = draw(20000, 3)  # independent draws: the region's true probability (sd 0.002)
    assert abs(_inside(r.geometry, check) - 0.9) < 0.015
    assert abs(r.mass - 0.9) < 0.03 and r.geometry.is_valid
    # each kernel (weight 0.99/25) holds 0.9/0.99 of its mass in its disc: 1 − exp(−κ r²/2) = 0.9/0.99
    r2 = -2.0 * math.log(1.0 - 0.9 / 0.99) / kappa[0]
    want = 25 * 2 * math.pi * (1 - math.cos(math.sqrt(r2))) * EARTH_RADIUS_KM**2
    assert abs(r.area_km2 / want - 1.0) < 0.1, (r.area_km2, want)
    minx, _, maxx, _ = r.geometry.bounds
    assert -180.0 <= minx and maxx <= 180.0 and minx < -179.99 and maxx > 179.99  # the disc at the antimeridian, cut in two


def test_no_disc_where_the_rest_of_the_density_already_reaches_tau_or_the_kernel_never_does():
    mu, kappa, log_w, log_density, _ = _mixture(n_sites=3)
    sites = narrow_sites(mu, kappa, log_w)
    assert site_discs(sites, log_density, math.log(0.01 / (4 * math.pi)) - 1.0) == []  # the floor alone is above τ
    assert site_discs(sites, log_density, float(log_density(mu[:1])[0]) + 1.0) == []  # above every peak
    assert len(site_discs(sites, log_density, float(log_density(mu[:1])[0]) - 1.0)) == 3
    assert narrow_sites(mu, kappa / 1e6, log_w) == []  # 300 km kernels: the grid's, not discs

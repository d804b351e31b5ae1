"""Highest-density regions (HDR) of a predicted distribution on S² as GIS polygons.

For one record with density p on the sphere and a probability mass q ∈ (0, 1), the HDR is
R_q = {x : p(x) ≥ τ_q}, with τ_q the level whose region holds mass q (∫_{R_q} p dA = q): the
smallest set holding q. Units: log densities are **nats per steradian** (what every sphere
method's ``log_likelihood`` returns); per km², log p_km² = log p_sr − 2 ln R_E, R_E = 6371.0088 km.

τ_q comes from the density grid (``tau="grid"``, default: nodes sorted by density, their masses
p·ΔA accumulated to q) or from samples drawn from p (``tau="samples"``: the (1 − q) quantile of
log p at the samples, since P(p(X) ≥ τ) = q for X ~ p; Monte-Carlo error ≈ √(q(1−q)/N) in mass).

The region is polygonised on adaptive regional lon/lat grids (:mod:`region_grid`): boxes around the
samples' high-density clusters (or, without samples, the densest nodes of a world grid), grown
where the region touches a box edge and zoomed/split onto each part until every part spans at
least about half its grid, then contoured at log τ with linear interpolation (contourpy). Boxes
crossing the antimeridian are cut there (RFC 7946); a box reaching a pole spans all longitudes and
its region reaches lat ±90. Geometry: shapely Polygon or MultiPolygon, lon/lat degrees, OGC:CRS84.
Area: on the sphere of radius R_E, edges taken straight in (λ, sin φ) (equal-area; exact for
meridians and parallels). Mass: Σ p·ΔA over the grid nodes inside the region (dual-cell weights).

Cost per record: the samples (``RegionOptions.samples`` draws and their log-likelihoods, unless
given) and grid evaluations ≤ max_passes × max_boxes × nodes², typically 2–4 passes of one box,
≈ 2–4 × nodes² (≈ 20–40 k log-likelihoods at nodes = 96): cheap for closed-form vMF methods, as
many ODE solves for flows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.infer.region_grid import grid_mass_inside, initial_boxes, lonlat_polygons, refine, region_parts, unit_lonlat
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM

__all__ = ["LOG_KM2_PER_SR", "REGION_DENSITIES", "KDE_FLOOR_KM", "RegionOptions", "HDRRegion", "hdr_region", "hdr_regions", "spherical_area_km2", "check_mass"]

#: 2 ln R_E: log p per km² = log p per steradian − LOG_KM2_PER_SR.
LOG_KM2_PER_SR = 2.0 * math.log(EARTH_RADIUS_KM)
TAU_SOURCES = ("grid", "samples")
#: Densities a region can be drawn from: the model's own ("exact") or a KDE of its draws ("kde").
REGION_DENSITIES = ("exact", "kde")
#: Smallest KDE kernel (km) of :func:`hdr_regions` with density "kde".
KDE_FLOOR_KM = 1.0


def check_mass(q, what: str = "region") -> float:
    """``q`` as a float in (0, 1), else a one-line ConfigError naming ``what``."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
        raise ConfigError(f"--{what} must be a probability mass in (0, 1) such as 0.5 or 0.9, got {q!r}")
    return float(q)


@dataclass(frozen=True)
class RegionOptions:
    """Grid and sampling budget of an HDR: ``nodes`` grid nodes along a box's longer side (ground
    distance; the other side proportional, at least nodes/3); ``max_passes`` grid refinements;
    ``max_boxes`` boxes per pass (more parts are covered by one box); ``samples`` draws per record
    that locate the modes in :func:`hdr_regions`; ``coarse_nodes`` world-grid nodes along the
    equator that locate them when no samples are given."""

    nodes: int = 96
    max_passes: int = 6
    max_boxes: int = 8
    samples: int = 1000
    coarse_nodes: int = 144

    def __post_init__(self):
        for name, least in (("nodes", 8), ("max_passes", 1), ("max_boxes", 1), ("samples", 16), ("coarse_nodes", 16)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise ConfigError(f"region option {name} must be a whole number >= {least}, got {v!r}")


@dataclass(frozen=True)
class HDRRegion:
    """The q-HDR of one record.

    q: requested mass; geometry: shapely Polygon/MultiPolygon (lon, lat degrees, OGC:CRS84; an
    empty Polygon when nothing was found); wkb: little-endian ISO WKB of it; area_km2: area on the
    sphere of radius R_E; mass: probability inside it on the grid, or for a vMF mixture the share of
    its draws inside (≈ q; a check of τ and of the
    grid); log_tau_sr: log τ in nats per steradian (``log_tau_km2`` per km²); tau_from: "grid" or
    "samples"; evaluations: log-density evaluations spent on grids.
    """

    q: float
    geometry: object
    wkb: bytes
    area_km2: float
    mass: float
    log_tau_sr: float
    tau_from: str
    evaluations: int

    @property
    def log_tau_km2(self) -> float:
        """log τ in nats per km² (log τ_sr − 2 ln R_E)."""
        return self.log_tau_sr - LOG_KM2_PER_SR

    @property
    def area_sr(self) -> float:
        """Area in steradians (area_km2 / R_E²)."""
        return self.area_km2 / EARTH_RADIUS_KM**2


def spherical_area_km2(geometry) -> float:
    """Area (km²) on the sphere of radius R_E of a lon/lat (degrees) polygon: planar area in the
    equal-area coordinates (λ radians, sin φ) times R_E²; edges straight in those coordinates."""
    import shapely

    def to_equal_area(xy):
        return np.column_stack([np.radians(xy[:, 0]), np.sin(np.radians(xy[:, 1]))])

    return float(shapely.transform(geometry, to_equal_area).area) * EARTH_RADIUS_KM**2


def _locate(log_density, samples, sample_logp, q: float, tau: str, opts: RegionOptions):
    """((boxes, grid evaluations), log τ from samples or None) to start the refinement from."""
    if samples is None:
        if tau == "samples":
            raise ConfigError("tau='samples' needs samples drawn from the density; give samples or use tau='grid'")
        return initial_boxes(log_density, None, None, q, opts.coarse_nodes), None
    x = np.asarray(samples, dtype=np.float64).reshape(-1, 3)
    lp = np.asarray(log_density(x) if sample_logp is None else sample_logp, dtype=np.float64).reshape(-1)
    if len(lp) != len(x) or len(x) == 0:
        raise ValueError(f"hdr_region: {len(x)} samples but {len(lp)} log densities")
    lp = np.where(np.isfinite(lp), lp, -np.inf)
    log_tau = float(np.quantile(lp[np.isfinite(lp)], 1.0 - q)) if np.isfinite(lp).any() else -math.inf
    return initial_boxes(log_density, x, lp, log_tau, opts.coarse_nodes), log_tau


def hdr_region(log_density: Callable[[np.ndarray], np.ndarray], q: float, *, samples=None, sample_logp=None,
               tau: str = "grid", options: RegionOptions | None = None, sites: list | None = None,
               mass_samples=None) -> HDRRegion:
    """The q-HDR of one record's density.

    log_density: xyz (M, 3) float64 unit vectors → (M,) log p, nats per steradian (non-finite =
    outside). samples: optional (N, 3) unit vectors drawn from p, with ``sample_logp`` (N,) their
    log densities (computed with ``log_density`` when omitted); they locate the modes (a 10 km
    peak is found only through them or a fine enough world grid) and give τ when ``tau="samples"``.
    sites: a vMF mixture's narrow kernels (:func:`~geopipe.pipeline.infer.mixture_regions.narrow_sites`),
    drawn as discs beside the grid's contour; the mass is then the share of ``mass_samples`` (other draws
    from p than those that set τ; default ``samples``) inside.
    """
    q = check_mass(q)
    if sites is not None and samples is None and mass_samples is None:
        raise ConfigError("hdr_region: sites (narrow kernels drawn as discs) need draws from the density to count the region's mass; "
                          "give samples or mass_samples")
    if tau not in TAU_SOURCES:
        raise ConfigError(f"unknown HDR level source {tau!r}; choose one of {list(TAU_SOURCES)}")
    opts = options or RegionOptions()
    (boxes, located), sample_tau = _locate(log_density, samples, sample_logp, q, tau, opts)
    fixed = sample_tau if tau == "samples" else None
    grids, log_tau, evaluations = refine(log_density, boxes, q, fixed, opts.nodes, opts.max_passes, opts.max_boxes)
    if sites is None:
        return _region(grids, q, log_tau, tau, located + evaluations)
    from geopipe.pipeline.infer.mixture_regions import site_discs

    discs = site_discs(sites, log_density, log_tau)
    check = samples if mass_samples is None else mass_samples
    return _region(grids, q, log_tau, tau, located + evaluations + len(sites), discs, np.asarray(check, dtype=np.float64).reshape(-1, 3))


def _region(grids, q: float, log_tau: float, tau: str, evaluations: int, discs=(), mass_samples=None) -> HDRRegion:
    import shapely
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.geometry.polygon import orient

    per_grid = [region_parts(g, log_tau) for g in grids]
    parts = lonlat_polygons([p for ps in per_grid for p in ps] + list(discs))
    geom = shapely.union_all(parts) if parts else Polygon()
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polys = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, Polygon) and not g.is_empty]
    polys = [orient(p, 1.0) for p in polys]  # exteriors counter-clockwise (RFC 7946 right-hand rule)
    geom = Polygon() if not polys else polys[0] if len(polys) == 1 else MultiPolygon(polys)
    if mass_samples is None:
        mass = float(sum(grid_mass_inside(g, ps) for g, ps in zip(grids, per_grid)))
    else:  # the share of the record's draws inside (±√(q(1−q)/N)): the grid's sum misses kernels narrower than its cells
        lon, lat = unit_lonlat(mass_samples)
        inside = shapely.contains_xy(geom, lon, lat) | shapely.intersects_xy(geom, lon, lat) if not geom.is_empty else np.zeros(len(lat), bool)
        mass = float(np.mean(inside)) if len(lat) else 0.0
    return HDRRegion(q, geom, shapely.to_wkb(geom, byte_order=1), spherical_area_km2(geom), mass, float(log_tau), tau, evaluations)


def hdr_regions(method, model, cond, q: float, *, options: RegionOptions | None = None, tau: str = "grid", samples=None,
                sample_logp=None, generator=None, steps: int = 16, sampler: str | None = None, rtol: float = 1e-5,
                atol: float = 1e-5, guidance: float = 0.0, chunk: int = 4096, keys=None, density: str = "exact",
                solver: str = "dopri5") -> list[HDRRegion]:
    """The q-HDR of each record of a batch under ``method``/``model`` (density at ``guidance``,
    default 0: unguided, as scored by NLL and calibration).

    cond: (B, C) conditioning on the model's device. samples / sample_logp: optional (B, N, 3) /
    (B, N) draws and their log densities (nats per steradian); otherwise ``options.samples`` draws
    per record are made and scored. Cost per record: those N draws and N log-likelihoods, plus
    the grid's evaluations (:class:`HDRRegion.evaluations`, ≈ 2–4 × nodes²), in batches of ``chunk``.

    density: "exact" — the model's own log-likelihood on the grid (closed form for vMF methods, one
    ODE solve per grid point for flows: minutes per record on a CPU); "kde" — a vMF-kernel density
    estimate of the N draws (:mod:`geopipe.pipeline.sphere.kde`, k-NN bandwidth floored at
    ``KDE_FLOOR_KM``): no likelihood evaluations at all, the region of the model smoothed by the
    kernel (mass and area are the KDE's). solver, rtol, atol: the likelihood ODE's. A method whose
    density is a closed-form vMF mixture (``method.mixture(model, cond)``, the hybrid) gets its
    kernels narrower than 10 km as discs, τ from the draws whatever ``tau`` says, and its mass
    counted on ``options.samples`` other draws (:mod:`~geopipe.pipeline.infer.mixture_regions`).
    """
    import torch

    if getattr(method, "space", "sphere") != "sphere":
        raise ConfigError(f"HDR regions need a density on the sphere; method {getattr(method, 'name', '?')!r} models R³ "
                          "(its projected draws are not distributed as its density on S²); use an S² method (rfm, vmf, ...)")
    opts = options or RegionOptions()
    check_mass(q)
    if density not in REGION_DENSITIES:
        raise ConfigError(f"unknown region density {density!r}; choose one of {list(REGION_DENSITIES)}")
    with torch.no_grad():
        if density == "kde":
            if samples is None:
                samples = method.sample(model, cond, opts.samples, steps=steps, guidance=guidance, sampler=sampler, generator=generator,
                                        keys=keys)
            return [_kde_region(torch.as_tensor(x).double().cpu().numpy(), q, tau, opts) for x in samples]
        if samples is None:
            samples = method.sample(model, cond, opts.samples, steps=steps, guidance=guidance, sampler=sampler, generator=generator, keys=keys)
            flat = cond.repeat_interleave(samples.shape[1], dim=0)
            sample_logp = method.log_likelihood(model, samples.reshape(-1, 3), flat, rtol=rtol, atol=atol,
                                                guidance=guidance, method=solver).reshape(samples.shape[:2])
        xs = torch.as_tensor(samples).double().cpu().numpy()
        lps = None if sample_logp is None else torch.as_tensor(sample_logp).double().cpu().numpy()
        param = next(iter(model.parameters()), None)
        dtype = param.dtype if param is not None else cond.dtype

        def evaluator(b: int):
            def log_density(xyz: np.ndarray) -> np.ndarray:
                x = torch.as_tensor(xyz, dtype=dtype, device=cond.device)
                out = [method.log_likelihood(model, x[s:s + chunk], cond[b:b + 1].expand(len(x[s:s + chunk]), -1), rtol=rtol, atol=atol,
                                             guidance=guidance, method=solver) for s in range(0, len(x), chunk)]
                return torch.cat(out).double().cpu().numpy()
            return log_density

        mixture = getattr(method, "mixture", None)  # a closed-form vMF mixture: narrow kernels as discs, τ from the draws
        if mixture is None:
            return [hdr_region(evaluator(b), q, samples=xs[b], sample_logp=None if lps is None else lps[b], tau=tau, options=opts)
                    for b in range(len(xs))]
        from geopipe.pipeline.infer.mixture_regions import narrow_sites

        p = mixture(model, cond)
        mu, kappa, log_w = (t.double().cpu().numpy() for t in (p.mu, p.kappa, p.log_w[:, :-1]))
        fresh = method.sample(model, cond, opts.samples, generator=generator, keys=keys).double().cpu().numpy()  # the mass check's draws
        return [hdr_region(evaluator(b), q, samples=xs[b], sample_logp=None if lps is None else lps[b], tau="samples", options=opts,
                           sites=narrow_sites(mu[b], kappa[b], log_w[b]), mass_samples=fresh[b]) for b in range(len(xs))]


def _kde_region(xs: np.ndarray, q: float, tau: str, opts: RegionOptions) -> HDRRegion:
    """The q-HDR of the vMF-kernel KDE of one record's draws ``xs`` (N, 3)."""
    from geopipe.pipeline.sphere.kde import kde_bandwidth_km, kde_kappa, kde_log_density

    kappa = kde_kappa(kde_bandwidth_km(xs, math.degrees(KDE_FLOOR_KM / EARTH_RADIUS_KM)))
    return hdr_region(lambda xyz: kde_log_density(xs, kappa, xyz), q, samples=xs, sample_logp=kde_log_density(xs, kappa, xs),
                      tau=tau, options=opts)

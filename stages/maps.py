"""Maps stage: PNG pictures of predicted densities for chosen records, and calibration plots.

``run_maps``: checkpoint + store → one equirectangular world map per record with the predicted
density (exact log-likelihood grid, or a vMF-kernel KDE of model samples), the true location and
the point prediction; beside each ``map-<key>.png`` the drawn grid as ``map-<key>.tif`` (GeoTIFF,
float32 probability per km², EPSG:4326) and the q highest-density region with both points as
``map-<key>.geojson`` (RFC 7946; :mod:`geopipe.pipeline.viz.gis`). ``run_calibration_plot``: an evaluate report JSON → HDR calibration PNG
(one curve per model entry that has a calibration section).
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from geopipe.pipeline.artifacts.report import read_report
from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.infer.predictor import Predictor, load_predictor, record_generator
from geopipe.pipeline.infer.regions import check_mass, hdr_region, hdr_regions
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, xyz_to_latlon
from geopipe.pipeline.sphere.kde import kde_bandwidth_km, kde_log_density
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.space import store_space
from geopipe.pipeline.viz.density_grid import (
    density_grid_kde,
    density_grid_loglik,
    grid_mass,
    hdr_extent,
    latlon_grid,
)
from geopipe.pipeline.viz.gis import point_feature, region_features, write_density_geotiff, write_geojson
from geopipe.pipeline.viz.render import render_calibration_plot, render_density_map

__all__ = ["MAP_MODES", "MapConfig", "MapResult", "map_mode", "run_maps", "CalibrationPlotConfig", "CalibrationPlotResult", "run_calibration_plot"]

#: Density sources: auto (kde on a CPU, loglik on a GPU), exact log-likelihood on the grid, or a KDE of model samples.
MAP_MODES = ("auto", "loglik", "kde")
_GRID_CHUNK = 1024  # grid points per likelihood solve: progress every few seconds on a CPU


@dataclass(frozen=True)
class MapConfig:
    """Options of ``geopipe map``.

    keys: records to draw (empty: the first ``n_records`` of the store); mode: "auto" (default:
    "kde" when the model runs on a CPU, "loglik" on a GPU — the exact grid solves an ODE per cell,
    about a minute per map of a small model on a CPU), "loglik" (exact
    log p on every cell centre, rtol/atol for the ODE) or "kde" (``kde_samples`` model samples
    smoothed with a vMF kernel of ``bandwidth_km``, default: k-NN rule of
    :func:`geopipe.pipeline.viz.density_grid.kde_bandwidth_km`); resolution_deg: grid cell size, degrees (must divide
    180). The point prediction uses ``steps``/``guidance`` (docs/methods.md#samplers); the drawn density is the
    model's p(x | c) at ``density_guidance`` (0 = unguided, as scored by NLL and calibration).
    zoom: when the 95% HDR, truth and prediction fit in a regional view, draw that view from a
    second grid with as many cells as the world grid (so loglik mode costs up to twice as much).
    region: mass q of the highest-density region written as ``map-<key>.geojson`` (None: no file;
    loglik mode: of the model's density, S² methods only, ≈ 1000 draws and 20–40 k log-likelihoods
    more per record; kde mode: of the KDE). overwrite: replace files of an earlier map in
    ``out_dir`` (else refused before any drawing).
    """

    checkpoint: str
    store: str
    out_dir: str
    keys: tuple[str, ...] = ()
    n_records: int = 4
    mode: str = "auto"
    resolution_deg: float = 3.0
    kde_samples: int = 2048
    bandwidth_km: float | None = None
    steps: int = 16
    guidance: float = 2.0
    density_guidance: float = 0.0
    seed: int = 3407
    rtol: float = 1e-4
    atol: float = 1e-4
    zoom: bool = True
    device: str = "auto"
    progress: bool = True
    region: float | None = 0.9
    overwrite: bool = False

    def __post_init__(self):
        if isinstance(self.keys, (list, str)):
            object.__setattr__(self, "keys", (self.keys,) if isinstance(self.keys, str) else tuple(self.keys))
        if self.mode not in MAP_MODES:
            raise ConfigError(f"unknown map mode {self.mode!r}; choose one of {list(MAP_MODES)}")
        latlon_grid(self.resolution_deg)  # raises a ValueError naming valid resolutions
        for name, low in (("n_records", 1), ("kde_samples", 2), ("steps", 1)):
            check_int(getattr(self, name), name, low, where="map")
        if self.bandwidth_km is not None and not self.bandwidth_km > 0:
            raise ConfigError(f"map: bandwidth_km must be > 0 km, got {self.bandwidth_km!r}")
        if self.region is not None:
            check_mass(self.region)


@dataclass(frozen=True)
class MapResult:
    """paths: PNG per record (same order as keys); masses: grid integral Σ p·ΔA of each drawn density;
    rasters: GeoTIFF of each drawn grid; regions: GeoJSON of each HDR (None where none was written)."""

    paths: tuple[str, ...]
    keys: tuple[str, ...]
    masses: tuple[float, ...]
    rasters: tuple[str, ...] = ()
    regions: tuple[str | None, ...] = ()


def map_mode(device) -> str:
    """The density source of mode "auto" on ``device`` (a torch.device): the exact likelihood grid
    on a GPU, the KDE of model samples on a CPU."""
    return "loglik" if device.type == "cuda" else "kde"


class _Drawn(NamedTuple):
    """One record's files: PNG path, world-grid mass, GeoTIFF path, GeoJSON path (or None)."""

    path: str
    mass: float
    raster: str
    region: str | None


def _select_rows(cfg: MapConfig, keys: np.ndarray) -> list[int]:
    if not cfg.keys:
        return list(range(min(cfg.n_records, len(keys))))
    index = {k: i for i, k in enumerate(keys.tolist())}
    rows = []
    for k in cfg.keys:
        if k not in index:
            sample = ", ".join(repr(v) for v in keys[:3].tolist())
            raise GeopipeError(f"key {k!r} is not in store {cfg.store} ({len(keys)} keys, e.g. {sample})")
        rows.append(index[k])
    return rows


def _safe_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "record"


def _density(cfg: MapConfig, p: Predictor, cond: torch.Tensor, g: torch.Generator, extent=None, cache=None, bar=None):
    """(grid, caption) of the record's density (nats per steradian) on the world or ``extent``.

    ``cache`` (a dict) keeps the KDE samples (and an R³ density's normaliser) between the world
    and zoomed grids; ``bar`` (a :class:`Progress`) counts exact-likelihood grid points.
    """
    res = cfg.resolution_deg if extent is None else (extent[1] - extent[0]) * cfg.resolution_deg / 360.0
    if cfg.mode == "kde":
        cache = {} if cache is None else cache
        if "x" not in cache:
            with torch.no_grad():
                x = p.method.sample(p.model, cond, cfg.kde_samples, steps=cfg.steps, guidance=cfg.density_guidance, generator=g)
            cache["x"] = x[0].double().cpu().numpy()
        bw = cfg.bandwidth_km or kde_bandwidth_km(cache["x"], res)  # the k-NN width, floored at this grid's cell
        cache["kappa"] = (EARTH_RADIUS_KM / bw) ** 2  # the drawn (last) grid's kernel, for the region
        grid = density_grid_kde(cache["x"], res, bandwidth_km=bw, extent=extent)
        return grid, f"KDE of {cfg.kde_samples} samples, σ = {bw:,.0f} km"
    grid = density_grid_loglik(p.method, p.model, cond[0], res, rtol=cfg.rtol, atol=cfg.atol, guidance=cfg.density_guidance,
                               extent=extent, chunk=_GRID_CHUNK, on_points=bar.update if bar is not None else None)
    caption = f"exact log-likelihood on a {cfg.resolution_deg:g}° grid"
    if p.method.space != "sphere":  # an R³ density: show its restriction to S², renormalised
        if extent is None:
            cache = {} if cache is None else cache
            cache["log_z"] = math.log(grid_mass(grid))
        grid = grid._replace(logp=grid.logp - (cache or {}).get("log_z", 0.0))
        caption += " (R³ density on S², renormalised)"
    return grid, caption


def _draw_record(cfg: MapConfig, p: Predictor, cond, g, key: str, truth, pred, bar: Progress | None = None) -> _Drawn:
    """Render one record's map and write its GeoTIFF and GeoJSON beside it."""
    cache: dict = {}
    grid, caption = _density(cfg, p, cond, g, cache=cache, bar=bar)
    mass = grid_mass(grid)
    points = [pt for pt in (truth, pred) if pt is not None]
    extent = hdr_extent(grid, include=points) if cfg.zoom else None
    if extent is not None:
        if cfg.mode == "loglik" and bar is not None:  # the zoomed grid has as many points again
            bar.total += grid.logp.size
        grid, caption = _density(cfg, p, cond, g, extent=extent, cache=cache, bar=bar)
        caption += f"; view holds {min(grid_mass(grid) / mass, 1.0):.0%} of the probability"
    path = os.path.join(cfg.out_dir, f"map-{_safe_name(key)}.png")
    render_density_map(path, *grid, true_latlon=truth, pred_latlon=pred, extent=extent,
                       title=f"{key} · {p.method.name}\n{caption}")
    raster = write_density_geotiff(path[:-4] + ".tif", grid, description=f"{key} · {p.method.name}: {caption}")
    return _Drawn(path, mass, raster, _write_region(cfg, p, cond, g, key, truth, pred, cache, path[:-4] + ".geojson"))


def _write_region(cfg: MapConfig, p: Predictor, cond, g, key: str, truth, pred, cache: dict, path: str) -> str | None:
    """The record's ``cfg.region`` HDR with the truth and prediction points as GeoJSON at ``path``;
    None when not requested or undefined (loglik mode of an R³ model: its restriction to S² is no
    density its samples follow)."""
    if cfg.region is None or (cfg.mode == "loglik" and p.method.space != "sphere"):
        return None
    if cfg.mode == "kde":
        x, kappa = cache["x"], cache["kappa"]
        region = hdr_region(lambda xyz: kde_log_density(x, kappa, xyz), cfg.region, samples=x)
    else:
        region = hdr_regions(p.method, p.model, cond, cfg.region, generator=g, steps=cfg.steps, rtol=cfg.rtol, atol=cfg.atol,
                             guidance=cfg.density_guidance, chunk=_GRID_CHUNK, keys=[key])[0]
    features = [region_features(region, key=key, method=p.method.name, density="kde" if cfg.mode == "kde" else "model")]
    features += [point_feature(*pt, kind=kind, key=key) for pt, kind in ((pred, "prediction"), (truth, "truth")) if pt is not None]
    return write_geojson(path, features)


def _check_outputs(cfg: MapConfig, keys: list[str]) -> None:
    """Refuse, before any drawing, to replace the files of an earlier map unless ``cfg.overwrite``."""
    if cfg.overwrite:
        return
    names = [f"map-{_safe_name(k)}{ext}" for k in keys for ext in (".png", ".tif", ".geojson")]
    there = [n for n in names if os.path.exists(os.path.join(cfg.out_dir, n))]
    if there:
        raise GeopipeError(f"{cfg.out_dir} already holds {len(there)} file(s) this map writes ({there[0]}, ...); "
                           "pass --overwrite to replace them, or choose another --out-dir")


def run_maps(cfg: MapConfig) -> MapResult:
    """Draw one density map per selected record into ``cfg.out_dir`` (``map-<key>.png``, ``.tif``, ``.geojson``)."""
    store = open_store(cfg.store)
    keys = np.asarray(store.keys[:]).astype(str)
    rows = _select_rows(cfg, keys)
    if not rows:
        raise GeopipeError(f"store {cfg.store} has no records to draw")
    _check_outputs(cfg, [str(keys[r]) for r in rows])
    p = load_predictor(cfg.checkpoint, resolve_device(cfg.device), store_space(store), f"store {cfg.store}")
    if cfg.mode == "auto":
        cfg = replace(cfg, mode=map_mode(p.device))
        if cfg.progress:
            print(f"map: density by {cfg.mode} on {p.device.type}" + (" (--mode loglik draws the exact likelihood grid: a GPU job)"
                                                                       if cfg.mode == "kde" else ""), file=sys.stderr)
    os.makedirs(cfg.out_dir, exist_ok=True)
    drawn = []
    n_grid = int(np.prod([len(a) for a in latlon_grid(cfg.resolution_deg)]))
    loglik = cfg.mode == "loglik"
    bar = Progress(len(rows) * n_grid if loglik else len(rows), "map", "point" if loglik else "rec", enabled=cfg.progress)
    for row in rows:
        key = str(keys[row])
        g = record_generator(cfg.seed, row, p.device)
        cond = p.condition(np.asarray(store.embeddings[row:row + 1]))  # (1, D) standardised as in training
        with torch.no_grad():
            point = p.method.predict_point(p.model, cond, steps=cfg.steps, guidance=cfg.guidance, generator=g, keys=[key])
        pred = xyz_to_latlon(point.double(), keys=[key])[0].cpu().numpy()
        truth = np.asarray(store.latlon[row], dtype=np.float64)
        drawn.append(_draw_record(cfg, p, cond, g, key, tuple(truth) if np.isfinite(truth).all() else None, tuple(pred), bar))
        if not loglik:
            bar.update(1)
    bar.close()
    return MapResult(tuple(d.path for d in drawn), tuple(str(keys[r]) for r in rows), tuple(d.mass for d in drawn),
                     tuple(d.raster for d in drawn), tuple(d.region for d in drawn))


@dataclass(frozen=True)
class CalibrationPlotConfig:
    """Options of ``geopipe calibration-plot``: an evaluate report JSON in, a PNG out."""

    report_json: str
    out: str
    title: str = "HDR calibration"


@dataclass(frozen=True)
class CalibrationPlotResult:
    out: str
    names: tuple[str, ...]


def run_calibration_plot(cfg: CalibrationPlotConfig) -> CalibrationPlotResult:
    """Plot coverage(p) of every report entry with a calibration section (one curve each)."""
    doc = read_report(cfg.report_json)
    curves = [e for e in doc["reports"] if isinstance(e, dict) and (e.get("calibration") or {}).get("coverage")]
    if not curves:
        raise GeopipeError(f"report {cfg.report_json!r} has no calibration section; predict with "
                           "`--localizability N` (with truths) so the predictions carry hdr_rank, then evaluate again")
    levels = [c["calibration"]["levels"] for c in curves]
    if len({len(lv) for lv in levels}) != 1:
        raise GeopipeError(f"report {cfg.report_json!r}: models were scored at different numbers of calibration levels")
    labels = [f"{c.get('name', '?')}, n={c['calibration'].get('n', '?')}" for c in curves]
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    render_calibration_plot(cfg.out, levels, [c["calibration"]["coverage"] for c in curves],
                            [c["calibration"].get("error") for c in curves], labels, title=cfg.title)
    return CalibrationPlotResult(cfg.out, tuple(str(c.get("name", "?")) for c in curves))

"""Pictures of predicted densities and of calibration: PNG rendering with matplotlib (Agg, no pyplot).

:func:`render_density_map` draws a density grid (see :mod:`geopipe.pipeline.viz.density_grid`) on an
equirectangular world map, or a zoomed ``extent`` of it, with the world outline of
:mod:`geopipe.pipeline.viz.land_outline` (bundled Natural Earth 110m, public domain), the true location and
the point prediction. :func:`render_calibration_plot` draws HDR coverage curves
(:mod:`geopipe.pipeline.eval.calibration`) for one or several models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, haversine_km
from geopipe.pipeline.viz.land_outline import load_outline

__all__ = ["render_density_map", "render_calibration_plot"]


def _draw_outline(ax) -> None:
    from matplotlib import patheffects
    from matplotlib.collections import LineCollection

    outline = load_outline()
    ax.add_collection(LineCollection(outline["borders"], colors="0.55", linewidths=0.35, zorder=3))
    coast = LineCollection(outline["coastline"], colors="0.1", linewidths=0.7, zorder=3)
    coast.set_path_effects([patheffects.withStroke(linewidth=1.8, foreground=(1, 1, 1, 0.6))])  # readable on dark colours
    ax.add_collection(coast)


def _deg(v: float, pos: str, neg: str) -> str:
    text = f"{abs(v):.0f}" if abs(v - round(v)) < 1e-6 else f"{abs(v):.1f}"
    return f"{text}°{pos if v > 0 else neg if v < 0 else ''}"


def _style_axes(ax, extent) -> None:
    from matplotlib.ticker import MaxNLocator

    lon0, lon1, lat0, lat1 = extent if extent is not None else (-180, 180, -90, 90)
    ax.set_xlim(lon0, lon1)
    ax.set_ylim(lat0, lat1)
    ax.set_aspect("equal")
    if extent is None:
        ax.set_xticks(range(-180, 181, 60))
        ax.set_yticks(range(-90, 91, 30))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(lambda v, _: _deg(v, "E", "W"))
    ax.yaxis.set_major_formatter(lambda v, _: _deg(v, "N", "S"))
    ax.grid(color="0.8", linewidth=0.4, zorder=1)
    ax.tick_params(labelsize=9)


def render_density_map(path, lats, lons, logp, *, true_latlon=None, pred_latlon=None, title: str = "", extent=None,
                       decades: float = 5.0, cmap: str = "viridis", figsize=(11.0, 5.7), dpi: int = 150) -> str:
    """Write an equirectangular PNG of a density grid with the world outline and markers.

    logp (H, W) nats per steradian on cell centres ``lats`` (H,), ``lons`` (W,) degrees. Colour:
    probability per km² = exp(logp) / R_E² on a log scale from the grid's minimum to its maximum,
    or, when the grid spans more than ``decades`` powers of ten, from max·10^−decades (lower
    densities fade out and are left blank). true_latlon / pred_latlon: (lat, lon) degrees,
    drawn as a green star / red cross (the legend gives their great-circle distance). extent:
    (lon0, lon1, lat0, lat1) degrees to zoom on (e.g. from
    :func:`geopipe.pipeline.viz.density_grid.hdr_extent`); None = world.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    logp = np.asarray(logp, dtype=np.float64)
    lats, lons = np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64)
    if logp.shape != (len(lats), len(lons)):
        raise ValueError(f"logp must have shape (len(lats), len(lons)) = {(len(lats), len(lons))}, got {logp.shape}")
    per_km2 = np.exp(logp - 2.0 * math.log(EARTH_RADIUS_KM))
    finite = per_km2[np.isfinite(per_km2) & (per_km2 > 0)]
    if finite.size == 0:
        raise ValueError("render_density_map: the density grid has no finite, positive value")
    top, low = float(finite.max()), float(finite.min())
    floor = top * 10.0 ** (-float(decades))
    clipped = low < floor
    norm = LogNorm(vmin=floor if clipped else min(low, top / 2.0), vmax=top)  # top/2: a flat grid still spans a range
    shown = np.ma.masked_where(~np.isfinite(per_km2) | (per_km2 < norm.vmin), per_km2)
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")  # no pyplot: no global state, Agg canvas
    ax = fig.add_subplot()
    ax.set_facecolor("#f4f6f8")
    mesh = ax.pcolormesh(_edges(lons), _edges(lats), shown, cmap=_faded(cmap) if clipped else cmap, norm=norm, shading="flat", zorder=2, rasterized=True)
    _draw_outline(ax)
    _style_axes(ax, extent)
    _draw_markers(ax, true_latlon, pred_latlon)
    bar = fig.colorbar(mesh, ax=ax, shrink=0.82, pad=0.015, extend="min" if clipped else "neither")
    bar.set_label("probability density (per km², log scale)", fontsize=10)
    bar.ax.tick_params(labelsize=9)
    if title:
        ax.set_title(title, fontsize=12)
    fig.savefig(path, dpi=dpi)
    return str(path)


def _faded(name: str, fade: float = 0.2):
    """``name`` colormap whose lowest ``fade`` fraction ramps from transparent to opaque."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    colors = colormaps[name](np.linspace(0.0, 1.0, 256))
    colors[:, 3] = np.clip(np.linspace(0.0, 1.0, 256) / fade, 0.0, 1.0)
    return ListedColormap(colors, name=f"{name}_faded")


def _edges(centres: np.ndarray) -> np.ndarray:
    step = centres[1] - centres[0] if len(centres) > 1 else 360.0
    return np.concatenate([centres - step / 2, centres[-1:] + step / 2])


def _draw_markers(ax, true_latlon, pred_latlon) -> None:
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=3.5, foreground="white")]  # readable on any colour
    handles = []
    if true_latlon is not None:
        star = ax.scatter([true_latlon[1]], [true_latlon[0]], marker="*", s=300, c="#16a34a", edgecolors="black",
                          linewidths=0.9, zorder=6, label="true location")
        star.set_path_effects(halo)
        handles.append(star)
    if pred_latlon is not None:
        label = "prediction"
        if true_latlon is not None:
            km = float(haversine_km(true_latlon[0], true_latlon[1], pred_latlon[0], pred_latlon[1]))
            label += f" ({km:,.0f} km from the truth)"
        cross = ax.scatter([pred_latlon[1]], [pred_latlon[0]], marker="X", s=170, c="#dc2626", edgecolors="black",
                           linewidths=0.8, zorder=7, label=label)
        cross.set_path_effects(halo)
        handles.append(cross)
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=9, framealpha=0.92)


def _as_curves(levels, coverage, error, label) -> list[tuple[np.ndarray, np.ndarray, float | None, str]]:
    cov = np.asarray(coverage, dtype=np.float64)
    cov = cov[None, :] if cov.ndim == 1 else cov
    m = len(cov)
    lev = np.asarray(levels, dtype=np.float64)
    lev = np.broadcast_to(lev, cov.shape) if lev.ndim == 1 else lev
    labels = [label] * m if isinstance(label, str) else list(label)
    errors = [error] * m if error is None or np.ndim(error) == 0 else list(error)
    if cov.ndim != 2 or lev.shape != cov.shape or len(labels) != m or len(errors) != m:
        raise ValueError(f"calibration plot: {m} coverage curve(s) need matching levels, errors and labels")
    return [(lev[i], cov[i], None if errors[i] is None else float(errors[i]), str(labels[i])) for i in range(m)]


def render_calibration_plot(path, levels, coverage, error=None, label: str | Sequence[str] = "model", *,
                            title: str = "HDR calibration", dpi: int = 150) -> str:
    """Write a PNG of HDR coverage against probability level (see :mod:`geopipe.pipeline.eval.calibration`).

    levels (K,) or (M, K); coverage (K,) or (M, K) fractions; error: mean |coverage − p| per
    curve (float or (M,)); label: str or M names. The diagonal is perfect calibration; below it
    the model is over-confident, above it under-confident.
    """
    from matplotlib.figure import Figure

    curves = _as_curves(levels, coverage, error, label)
    rows = -(-(len(curves) + 1) // 2)  # legend below the axes, two columns: it never hides a curve
    fig = Figure(figsize=(6.4, 6.3 + 0.22 * rows), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="0.45", lw=1.2, label="perfectly calibrated")
    for lev, cov, err, name in curves:
        text = name if err is None else f"{name} (error {err:.3f})"
        ax.plot(lev, cov, marker="o", ms=5, lw=2, label=text)
    ax.text(0.04, 0.93, "under-confident", fontsize=9, color="0.4", transform=ax.transAxes)
    ax.text(0.96, 0.05, "over-confident", fontsize=9, color="0.4", ha="right", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    fig.suptitle(title)
    ax.set_xlabel("HDR probability level p", fontsize=11)
    ax.set_ylabel("coverage: fraction of true locations in the p-HDR", fontsize=11)
    ax.grid(color="0.88", lw=0.6)
    fig.legend(loc="outside lower center", ncols=2, fontsize=9, frameon=False)
    fig.savefig(path, dpi=dpi)
    return str(path)

"""Maps of embedding inspection (matplotlib Agg, no pyplot): a probe's nearest-neighbour
gallery on the world outline, and the k-means prototypes coloured by geo-purity
(:mod:`geopipe.pipeline.inspection`). The stores keep no thumbnails, so a gallery is drawn as
positions: the probe, its neighbours coloured by cosine similarity, and a line to each."""

from __future__ import annotations

import numpy as np

from geopipe.pipeline.viz.failure_plots import _save
from geopipe.pipeline.viz.render import _draw_outline, _style_axes

__all__ = ["map_extent", "render_gallery_map", "render_prototypes_map"]


def map_extent(latlon: np.ndarray, pad: float = 0.25, min_span_deg: float = 20.0):
    """(lon0, lon1, lat0, lat1) degrees around the finite (N, 2) points, padded by ``pad`` of the
    span and at least ``min_span_deg`` wide (2:1 aspect at most); None (the world) when they
    span more than half of it."""
    ll = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    ll = ll[np.isfinite(ll).all(axis=1)]
    if ll.size == 0:
        return None
    lat0, lat1 = ll[:, 0].min(), ll[:, 0].max()
    lon0, lon1 = ll[:, 1].min(), ll[:, 1].max()
    if lon1 - lon0 > 180.0 or lat1 - lat0 > 90.0:
        return None
    span = max(lon1 - lon0, 2.0 * (lat1 - lat0), min_span_deg) * (1.0 + 2.0 * pad)
    cx, cy = (lon0 + lon1) / 2.0, (lat0 + lat1) / 2.0
    half_x, half_y = span / 2.0, span / 4.0
    return (max(cx - half_x, -180.0), min(cx + half_x, 180.0), max(cy - half_y, -90.0), min(cy + half_y, 90.0))


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.0, 5.6), layout="constrained")
    ax = fig.add_subplot()
    ax.set_facecolor("#f4f6f8")
    return fig, ax


def render_gallery_map(path: str, probe_latlon, neighbours_latlon, similarity, *, title: str = "") -> str:
    """PNG of one gallery: the probe (a star; skipped when its location is NaN), its (k, 2)
    neighbours (degrees) coloured by their (k,) cosine similarity, a line from the probe to each."""
    from matplotlib.collections import LineCollection

    p = np.asarray(probe_latlon, dtype=np.float64).reshape(2)
    nb = np.asarray(neighbours_latlon, dtype=np.float64).reshape(-1, 2)
    fig, ax = _figure()
    if np.isfinite(p).all() and len(nb):
        ax.add_collection(LineCollection([[(p[1], p[0]), (b[1], b[0])] for b in nb], colors="0.35", linewidths=0.8, zorder=4))
    sc = ax.scatter(nb[:, 1], nb[:, 0], c=np.asarray(similarity, dtype=np.float64), cmap="viridis", s=46, edgecolors="black",
                    linewidths=0.5, zorder=5, label="neighbours")
    if np.isfinite(p).all():
        ax.scatter([p[1]], [p[0]], marker="*", s=320, c="#dc2626", edgecolors="black", linewidths=0.9, zorder=6, label="probe")
    _draw_outline(ax)
    _style_axes(ax, map_extent(np.vstack([p[None], nb])))
    if len(nb):
        fig.colorbar(sc, ax=ax, shrink=0.8, pad=0.015).set_label("cosine similarity to the probe", fontsize=10)
    ax.legend(loc="lower left", fontsize=9, framealpha=0.92)
    if title:
        ax.set_title(title, fontsize=11)
    _save(fig, path)
    return str(path)


def render_prototypes_map(path: str, medoid_latlon, purity, sizes, *, title: str = "") -> str:
    """PNG of the prototypes: each cluster's medoid at its (K, 2) degree location, area ∝ its
    (K,) size, colour its (K,) geo-purity in [0, 1]."""
    ll = np.asarray(medoid_latlon, dtype=np.float64).reshape(-1, 2)
    size = np.asarray(sizes, dtype=np.float64)
    fig, ax = _figure()
    sc = ax.scatter(ll[:, 1], ll[:, 0], c=np.asarray(purity, dtype=np.float64), cmap="plasma", vmin=0.0, vmax=1.0,
                    s=20.0 + 200.0 * np.sqrt(size / max(size.max(), 1.0)), edgecolors="black", linewidths=0.5, alpha=0.85, zorder=5)
    _draw_outline(ax)
    _style_axes(ax, map_extent(ll))
    fig.colorbar(sc, ax=ax, shrink=0.8, pad=0.015).set_label("geo-purity (fraction of members near the medoid)", fontsize=10)
    if title:
        ax.set_title(title, fontsize=11)
    _save(fig, path)
    return str(path)

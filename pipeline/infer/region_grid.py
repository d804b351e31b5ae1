"""Adaptive lon/lat grids for highest-density regions (the machinery of :mod:`regions`).

A *box* is (lon0, lon1, lat0, lat1) in degrees with lon0 ∈ [−180, 180) and lon0 < lon1 ≤ lon0 + 360
(lon1 > 180: the box crosses the antimeridian); a box touching a pole spans all longitudes
(−180, 180), so lat ±90 and lon ±180 are then natural edges, not truncations. A :class:`Grid`
holds the log density (nats per steradian) at the box's ny × nx *nodes* (edges included) and
each node's dual-cell area ΔA in steradians (Σ ΔA = the box's area exactly).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Grid", "unit_lonlat", "evaluate", "grid_tau", "grid_mass_inside", "initial_boxes", "merge_boxes", "refine", "region_parts", "lonlat_polygons"]

_MIN_KEEP = 8  # high-density points that seed the boxes, at least


class Grid(NamedTuple):
    """box; lats (ny,), lons (nx,) node degrees (lons unwrapped: may exceed 180); logp (ny, nx)
    nats per steradian (−inf where non-finite); weights (ny, nx) dual-cell areas, steradians."""

    box: tuple
    lats: np.ndarray
    lons: np.ndarray
    logp: np.ndarray
    weights: np.ndarray


def unit_lonlat(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) degrees of unit vectors xyz (…, 3)."""
    return np.degrees(np.arctan2(xyz[..., 1], xyz[..., 0])), np.degrees(np.arcsin(np.clip(xyz[..., 2], -1.0, 1.0)))


def _full(box) -> bool:
    return box[1] - box[0] >= 360.0 - 1e-9


def _norm_box(lon0, lon1, lat0, lat1) -> tuple:
    """Clamp latitudes; a box reaching a pole, or 360° wide, spans all longitudes; lon0 → [−180, 180)."""
    lat0, lat1 = max(float(lat0), -90.0), min(float(lat1), 90.0)
    if lat0 <= -90.0 + 1e-9 or lat1 >= 90.0 - 1e-9 or lon1 - lon0 >= 360.0 - 1e-9:
        return (-180.0, 180.0, lat0, lat1)
    shift = 360.0 * math.floor((lon0 + 180.0) / 360.0)
    return (float(lon0 - shift), float(lon1 - shift), lat0, lat1)


def _nodes(box, nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Node latitudes and longitudes: ``nodes`` along the longer side on the ground, ≥ nodes/3 across."""
    lon0, lon1, lat0, lat1 = box
    c = 1.0 if lat0 <= 0.0 <= lat1 else math.cos(math.radians(min(abs(lat0), abs(lat1))))
    w, h = (lon1 - lon0) * c, lat1 - lat0
    big = max(w, h, 1e-12)
    nx, ny = (max(nodes // 3, 8, round(nodes * s / big)) for s in (w, h))
    return np.linspace(lat0, lat1, ny), np.linspace(lon0, lon1, nx)


def _edges(v: np.ndarray) -> np.ndarray:
    return np.r_[v[0], (v[:-1] + v[1:]) / 2.0, v[-1]]


def evaluate(log_density, box, nodes: int) -> Grid:
    """The log density at the box's nodes (one call of ``log_density`` with (ny·nx, 3) unit vectors)."""
    lats, lons = _nodes(box, nodes)
    phi, lam = np.meshgrid(np.radians(lats), np.radians(lons), indexing="ij")
    xyz = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1).reshape(-1, 3)
    lp = np.asarray(log_density(xyz), dtype=np.float64).reshape(-1)
    if lp.shape != (len(xyz),):
        raise ValueError(f"log_density returned {lp.shape[0]} values for {len(xyz)} points")
    lp = np.where(np.isfinite(lp), lp, -np.inf).reshape(len(lats), len(lons))
    weights = np.outer(np.diff(np.sin(np.radians(_edges(lats)))), np.radians(np.diff(_edges(lons))))
    return Grid(box, lats, lons, lp, weights)


def _cell_fraction(s: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """P(U_a + U_b ≥ s) for independent U_a ~ U[−a/2, a/2], U_b ~ U[−b/2, b/2] (a, b ≥ 0): the
    fraction of a cell where a linear function with ranges a, b along its sides exceeds its centre
    value + s (trapezoidal distribution; a step at s = 0 when a = b = 0)."""
    a, b = np.maximum(a, b), np.minimum(a, b)
    ab = np.maximum(a * b, 1e-300)
    lo, hi = -(a + b) / 2.0, (a + b) / 2.0
    cdf = np.where(s <= -(a - b) / 2.0, (s - lo) ** 2 / (2.0 * ab), np.where(s <= (a - b) / 2.0, (s + a / 2.0) / np.maximum(a, 1e-300),
                                                                               1.0 - (hi - s) ** 2 / (2.0 * ab)))
    return 1.0 - np.where(s <= lo, 0.0, np.where(s >= hi, 1.0, cdf))


def grid_tau(grids, q: float) -> float:
    """log τ (nats/sr) for mass q: the root of M(τ) = q, M(τ) = Σ_i p_i ΔA_i · f_i(τ) over the
    nodes of all ``grids``, f_i the fraction of node i's cell where the linear interpolant of log p
    (its differences to the neighbours) is ≥ τ — continuous in τ, so ties (the rows of a
    pole-centred density) and near-ties cost no quantisation. The lowest finite node when the
    grids hold less than q."""
    parts = []
    for g in grids:
        ell = g.logp
        with np.errstate(invalid="ignore"):
            span = [np.abs(np.gradient(ell, axis=k)) * np.where(np.isin(np.arange(n), (0, n - 1)), 0.5, 1.0).reshape(shape)
                    for k, n, shape in ((1, ell.shape[1], (1, -1)), (0, ell.shape[0], (-1, 1)))]
        span = [np.where(np.isfinite(x), x, 0.0) for x in span]
        ok = np.isfinite(ell)
        parts.append((ell[ok], np.exp(ell[ok]) * g.weights[ok], span[0][ok], span[1][ok]))
    ell, m, a, b = (np.concatenate(x) for x in zip(*parts))
    if ell.size == 0:
        return -math.inf
    lo, hi = float(ell.min()), float(ell.max())
    if float(np.sum(m)) <= q:
        return lo
    for _ in range(60):  # bisection: M decreases in τ
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if float(np.sum(m * _cell_fraction(mid - ell, a, b))) >= q else (lo, mid)
    return (lo + hi) / 2.0


def grid_mass_inside(g: Grid, polys: list) -> float:
    """Probability of the region ``polys`` (this grid's :func:`region_parts`) on the grid: Σ p_i ·
    area(dual cell i ∩ region), areas in the equal-area coordinates (λ radians, sin φ)."""
    import shapely

    if not polys:
        return 0.0
    region = shapely.transform(shapely.union_all(polys), _equal_area)
    x, y = np.radians(_edges(g.lons)), np.sin(np.radians(_edges(g.lats)))
    x0, y0 = np.meshgrid(x[:-1], y[:-1])
    x1, y1 = np.meshgrid(x[1:], y[1:])
    corners = [shapely.contains_xy(region, a, b) | shapely.intersects_xy(region, a, b) for a, b in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))]
    full, some = np.logical_and.reduce(corners), np.logical_or.reduce(corners)
    frac = full.astype(np.float64)
    mixed = some & ~full
    cells = shapely.box(x0[mixed], y0[mixed], x1[mixed], y1[mixed])
    frac[mixed] = shapely.area(shapely.intersection(cells, region)) / np.maximum(shapely.area(cells), 1e-300)
    p = np.where(np.isfinite(g.logp), np.exp(g.logp), 0.0)
    return float(np.sum(p * g.weights * frac))


def _equal_area(xy: np.ndarray) -> np.ndarray:
    """(lon, lat) degrees → (λ radians, sin φ): Lambert's cylindrical equal-area coordinates (area × R_E² = km²)."""
    return np.column_stack([np.radians(xy[:, 0]), np.sin(np.radians(xy[:, 1]))])


def _polygons(g: Grid, log_tau: float) -> list:
    """Filled contour {log p ≥ log τ} of the grid as shapely Polygons (grid coordinates, lon unwrapped)."""
    import contourpy
    from shapely.geometry import Polygon

    finite = np.isfinite(g.logp)
    if not finite.any() or not (g.logp >= log_tau).any():
        return []
    z = np.where(finite, g.logp, min(log_tau, g.logp[finite].min()) - 10.0)
    points, offsets = contourpy.contour_generator(x=g.lons, y=g.lats, z=z, fill_type="OuterOffset").filled(log_tau, z.max() + 1.0)
    polys = [Polygon(p[o[0]:o[1]], [p[a:b] for a, b in zip(o[1:-1], o[2:])]) for p, o in zip(points, offsets)]
    return [p for p in polys if not p.is_empty and p.area > 0]


def region_parts(g: Grid, log_tau: float) -> list:
    """The grid's region {log p ≥ log τ} as shapely Polygons in the grid's own (unwrapped) longitudes."""
    return _polygons(g, log_tau)


def lonlat_polygons(polys: list) -> list:
    """Polygons with longitudes in [−180, 180]: parts beyond 180 cut off and moved by −360 (RFC 7946)."""
    import shapely

    out = []
    for p in polys:
        if p.bounds[2] <= 180.0:
            out.append(p)
            continue
        east = shapely.affinity.translate(shapely.clip_by_rect(p, 180.0, -90.0, 540.0, 90.0), xoff=-360.0)
        out.extend(part for part in (shapely.clip_by_rect(p, -180.0, -90.0, 180.0, 90.0), east) if not part.is_empty)
    return out


def _union(a, b) -> tuple:
    """The smallest box holding boxes a and b (over longitude shifts)."""
    spans = [(min(a[0], b[0] + k), max(a[1], b[1] + k)) for k in (0.0, -360.0, 360.0)]
    lo, hi = min(spans, key=lambda s: s[1] - s[0])
    return _norm_box(lo, hi, min(a[2], b[2]), max(a[3], b[3]))


def _pair_tables(boxes: list) -> tuple[np.ndarray, np.ndarray]:
    """For every pair i < j (row-major order): whether the boxes overlap or touch (their latitudes,
    and their longitudes under a shift of 0 or ±360°), and the area (Δlon × Δsin lat) of the
    smallest box holding both over those shifts (what :func:`_union` returns, before normalising)."""
    b = np.asarray(boxes, dtype=np.float64)
    i, j = np.triu_indices(len(b), k=1)
    a, c = b[i], b[j]
    lat_ok = ~((a[:, 2] > c[:, 3] + 1e-9) | (c[:, 2] > a[:, 3] + 1e-9))
    touch = np.zeros(len(i), dtype=bool)
    span = np.full(len(i), np.inf)
    for k in (0.0, -360.0, 360.0):
        touch |= (a[:, 0] <= c[:, 1] + k + 1e-9) & (c[:, 0] + k <= a[:, 1] + 1e-9)
        span = np.minimum(span, np.maximum(a[:, 1], c[:, 1] + k) - np.minimum(a[:, 0], c[:, 0] + k))
    lat = np.sin(np.radians(np.maximum(a[:, 3], c[:, 3]))) - np.sin(np.radians(np.minimum(a[:, 2], c[:, 2])))
    return lat_ok & touch, span * lat


def merge_boxes(boxes, max_boxes: int) -> list:
    """Overlapping or touching boxes merged; then the pair with the smallest union merged until ≤ max_boxes.
    Pairs are scored with numpy (a hybrid model's record can hold ~70 boxes: 13 M Python calls before)."""
    boxes = list(dict.fromkeys(boxes))
    while len(boxes) > 1:
        touch, area = _pair_tables(boxes)
        hit = np.flatnonzero(touch)
        if hit.size == 0 and len(boxes) <= max_boxes:
            break
        pick = int(hit[0]) if hit.size else int(np.argmin(area))
        i, j = (int(v[pick]) for v in np.triu_indices(len(boxes), k=1))
        boxes = [b for k, b in enumerate(boxes) if k not in (i, j)] + [_union(boxes[i], boxes[j])]
    return boxes


def _circular_range(lon: np.ndarray) -> tuple[float, float]:
    """The shortest arc [lo, hi] (degrees, lo ∈ [−180, 180), hi ≤ lo + 360) holding every longitude."""
    s = np.sort((np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0)
    gaps = np.diff(np.r_[s, s[0] + 360.0])
    k = int(np.argmax(gaps))
    return (float(s[0]), float(s[-1])) if k == len(s) - 1 else (float(s[k + 1]), float(s[k] + 360.0))


def _components(adj: np.ndarray) -> np.ndarray:
    """Connected-component labels (n,) of a symmetric boolean adjacency matrix (n, n)."""
    label = np.full(len(adj), -1)
    for i in range(len(adj)):
        if label[i] >= 0:
            continue
        label[i] = c = label.max() + 1
        frontier = np.array([i])
        while frontier.size:
            frontier = np.flatnonzero(adj[frontier].any(axis=0) & (label < 0))
            label[frontier] = c
    return label


def _cluster_boxes(xyz: np.ndarray, link: float, pad: float) -> list:
    """One box per single-linkage cluster (link: angle, radians) of the unit vectors, padded by
    max(pad, a quarter of the cluster's angular radius)."""
    cos = np.clip(xyz @ xyz.T, -1.0, 1.0)
    label = _components(np.arccos(cos) <= link)
    boxes = []
    for c in range(label.max() + 1):
        x = xyz[label == c]
        mean = x.sum(axis=0)
        radius = float(np.arccos(np.clip(x @ (mean / max(np.linalg.norm(mean), 1e-300)), -1, 1)).max())
        p = math.degrees(max(pad, 0.25 * radius))
        lon, lat = unit_lonlat(x)
        lat0, lat1 = lat.min() - p, lat.max() + p
        lo, hi = _circular_range(lon)
        dl = p / math.cos(math.radians(min(89.0, max(abs(lat0), abs(lat1)))))
        boxes.append(_norm_box(lo - dl, hi + dl, lat0, lat1))
    return boxes


def initial_boxes(log_density, xyz, logp, log_tau: float, coarse_nodes: int) -> tuple[list, int]:
    """(boxes, grid evaluations) to start from: clusters of the samples ``xyz`` (N, 3) with
    ``logp`` ≥ log τ (at least the 8 densest); without samples (xyz None, log_tau then being q),
    of the densest nodes of a world grid of ``coarse_nodes`` × coarse_nodes/2 nodes."""
    if xyz is None:
        g = evaluate(log_density, (-180.0, 180.0, -90.0, 90.0), coarse_nodes)
        total = float(np.sum(np.exp(g.logp) * g.weights))
        # a grid whose mass is far from 1 misses a peak narrower than its nodes: seed at the densest nodes
        keep = g.logp >= (grid_tau([g], log_tau) if abs(total - 1.0) < 0.1 else g.logp.max() - 10.0)
        keep.flat[np.argmax(g.logp)] = True
        phi, lam = np.meshgrid(np.radians(g.lats), np.radians(g.lons), indexing="ij")
        xyz = np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1)[keep]
        xyz = xyz[np.argsort(-g.logp[keep], kind="stable")][:: max(1, int(keep.sum()) // 1500)]
        step = math.radians(max(g.lats[1] - g.lats[0], g.lons[1] - g.lons[0]))
        return _cluster_boxes(xyz, 1.5 * step, 2.0 * step), g.logp.size
    order = np.argsort(-logp, kind="stable")
    n = max(int(np.sum(logp >= log_tau)), min(_MIN_KEEP, len(logp)))
    x = xyz[order[:n]]
    x = x[:: max(1, len(x) // 1500)]  # the pairwise angles of at most ≈ 1500 points
    if len(x) < 2:
        return _cluster_boxes(x, 0.0, 1e-3), 0
    k = min(5, len(x) - 1)
    kth = np.sort(np.arccos(np.clip(x @ x.T, -1.0, 1.0)), axis=1)[:, k]
    link = max(3.0 * float(np.median(kth)), 1e-6)
    return _cluster_boxes(x, link, link), 0


def _adjust(box, g: Grid, polys: list, max_boxes: int) -> list:
    """Next boxes for one grid's region parts: grown where a part touches an edge that is not
    natural; else zoomed/split onto the parts (2-node margin) when that gains resolution; else kept."""
    if not polys:
        return []
    lon0, lon1, lat0, lat1 = box
    dx, dy = g.lons[1] - g.lons[0], g.lats[1] - g.lats[0]
    tol = 0.01 * min(dx, dy)
    bounds = np.array([p.bounds for p in polys])
    (minx, miny), (maxx, maxy) = bounds[:, :2].min(axis=0), bounds[:, 2:].max(axis=0)
    grow_x, grow_y = max(0.5 * (lon1 - lon0), 4 * dx), max(0.5 * (lat1 - lat0), 4 * dy)
    new = (lon0 - grow_x * (not _full(box) and minx <= lon0 + tol), lon1 + grow_x * (not _full(box) and maxx >= lon1 - tol),
           lat0 - grow_y * (lat0 > -90.0 and miny <= lat0 + tol), lat1 + grow_y * (lat1 < 90.0 and maxy >= lat1 - tol))
    if new != box:
        return [_norm_box(*new)]
    cands = []
    for p in polys:
        x0, y0, x1, y1 = p.bounds
        cands.append(_norm_box(max(lon0, x0 - 2 * dx), min(lon1, x1 + 2 * dx), max(lat0, y0 - 2 * dy), min(lat1, y1 + 2 * dy)))
    cands = merge_boxes(cands, max_boxes)
    frac = [(c[1] - c[0]) / (lon1 - lon0) * (c[3] - c[2]) / (lat1 - lat0) for c in cands]
    return cands if sum(frac) < 0.5 or (len(cands) > 1 and min(frac) < 0.1) else [box]


def _zoom_on_max(g: Grid) -> tuple:
    """A box of ±4 node spacings around the grid's densest node (a peak the grid missed)."""
    i, j = np.unravel_index(np.argmax(g.logp), g.logp.shape)
    dx, dy = 4 * (g.lons[1] - g.lons[0]), 4 * (g.lats[1] - g.lats[0])
    return _norm_box(g.lons[j] - dx, g.lons[j] + dx, g.lats[i] - dy, g.lats[i] + dy)


def refine(log_density, boxes, q: float, fixed_tau: float | None, nodes: int, max_passes: int, max_boxes: int):
    """(grids, log τ, evaluations): evaluate the boxes, set τ (``fixed_tau``, or from the grids
    for mass q), adjust the boxes, until they stop changing or after ``max_passes`` grids."""
    boxes = merge_boxes(boxes, max_boxes)
    cache: dict = {}
    evaluations = 0
    for attempt in range(max_passes):
        for b in boxes:
            if b not in cache:
                cache[b] = evaluate(log_density, b, nodes)
                evaluations += cache[b].logp.size
        grids = [cache[b] for b in boxes]
        log_tau = fixed_tau if fixed_tau is not None else grid_tau(grids, q)
        if attempt == max_passes - 1:
            break
        polys = [_polygons(g, log_tau) for g in grids]
        if not any(polys):
            new = [_zoom_on_max(g) for g in grids]
        else:
            new = [c for b, g, ps in zip(boxes, grids, polys) for c in _adjust(b, g, ps, max_boxes)]
        new = merge_boxes(new, max_boxes)
        if new == boxes:
            break
        boxes = new
    return grids, log_tau, evaluations

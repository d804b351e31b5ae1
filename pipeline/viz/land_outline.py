"""Offline world outline (coastlines and country borders) for the density maps.

The bundled asset ``ne_110m_outline.json`` is derived from **Natural Earth 1:110m
Admin-0 countries** (naturalearthdata.com, version 5.x; Natural Earth is in the **public
domain**: "No permission is needed to use Natural Earth"), as shipped inside the PyPI wheel
``geopandas==0.14.4`` (BSD-3-Clause) at ``geopandas/datasets/naturalearth_lowres/
naturalearth_lowres.shp``. Nothing is downloaded at run time.

Derivation (:func:`outline_from_shapefile`, reproducible with
``python -m geopipe.pipeline.viz.land_outline naturalearth_lowres.shp pipeline/viz/ne_110m_outline.json``):
every polygon ring is cut into edges; an edge used by exactly one ring is coastline, an edge
shared by two rings (the topologically consistent Natural Earth countries share vertices) is an
internal border. Edges along the map frame (the antimeridian λ = ±180° cutting Russia and Fiji,
and Antarctica's closing edge at φ = −90°) are dropped. Consecutive kept edges are chained back
into polylines; coordinates are stored as integer hundredths of a degree (lon, lat) pairs.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections import Counter

import numpy as np

__all__ = ["OUTLINE_ASSET", "load_outline", "outline_from_shapefile", "write_outline_asset"]

#: Path of the bundled outline asset (see the module docstring for provenance and licence).
OUTLINE_ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ne_110m_outline.json")

_PROVENANCE = {
    "source": "Natural Earth 1:110m Admin-0 countries (naturalearthdata.com), via the PyPI wheel geopandas==0.14.4 "
    "(geopandas/datasets/naturalearth_lowres/naturalearth_lowres.shp)",
    "licence": "Natural Earth: public domain; geopandas: BSD-3-Clause",
    "derivation": "geopipe.pipeline.viz.land_outline.outline_from_shapefile: unshared ring edges = coastline, shared = borders; "
    "map-frame edges (lon = ±180, lat = -90) dropped",
    "units": "integer hundredths of a degree, flat [lon0, lat0, lon1, lat1, ...] per polyline",
}


def _read_rings(path: str) -> list[list[tuple[float, float]]]:
    """Polygon rings (lists of (lon, lat) degrees) of an ESRI shapefile of type Polygon (5)."""
    with open(path, "rb") as fh:
        data = fh.read()
    if len(data) < 100 or struct.unpack(">i", data[:4])[0] != 9994:
        raise ValueError(f"{path} is not an ESRI shapefile (.shp)")
    rings, pos = [], 100
    while pos + 8 <= len(data):
        _, words = struct.unpack(">ii", data[pos:pos + 8])
        rec, pos = data[pos + 8:pos + 8 + 2 * words], pos + 8 + 2 * words
        kind = struct.unpack("<i", rec[:4])[0]
        if kind == 0:  # null shape
            continue
        if kind != 5:
            raise ValueError(f"{path}: shape type {kind} is not Polygon (5)")
        n_parts, n_pts = struct.unpack("<ii", rec[36:44])
        parts = list(struct.unpack(f"<{n_parts}i", rec[44:44 + 4 * n_parts])) + [n_pts]
        off = 44 + 4 * n_parts
        xy = struct.unpack(f"<{2 * n_pts}d", rec[off:off + 16 * n_pts])
        pts = list(zip(xy[0::2], xy[1::2]))
        rings.extend(pts[a:b] for a, b in zip(parts[:-1], parts[1:]))
    return rings


def _frame_edge(a, b) -> bool:
    on_meridian = abs(abs(a[0]) - 180.0) < 1e-6 and abs(abs(b[0]) - 180.0) < 1e-6
    on_pole = a[1] < -89.99 and b[1] < -89.99
    return on_meridian or on_pole


def _chains(rings, keep) -> list[list[tuple[int, int]]]:
    """Polylines of consecutive ring edges for which ``keep(edge)`` holds (ring wrap-around joined)."""
    lines = []
    for ring in rings:
        edges = list(zip(ring[:-1], ring[1:]))
        cur, ring_lines = [], []
        for a, b in edges:
            if keep(a, b):
                cur = cur or [a]
                cur.append(b)
            elif cur:
                ring_lines.append(cur)
                cur = []
        if cur:
            ring_lines.append(cur)
        if len(ring_lines) > 1 and ring_lines[0][0] == ring_lines[-1][-1]:
            ring_lines[0] = ring_lines.pop()[:-1] + ring_lines[0]
        lines.extend(ring_lines)
    return lines


def outline_from_shapefile(path: str) -> dict:
    """Coastline and border polylines from a Natural Earth countries shapefile (see module docstring).

    Returns {"coastline": [[lon0, lat0, lon1, lat1, …] …], "borders": [...]} in integer
    hundredths of a degree, plus the provenance fields.
    """
    rings = [[(round(x * 100), round(y * 100)) for x, y in r] for r in _read_rings(path)]
    count = Counter(frozenset(e) for r in rings for e in zip(r[:-1], r[1:]) if e[0] != e[1])
    deg = lambda p: (p[0] / 100.0, p[1] / 100.0)  # noqa: E731

    def coast(a, b):
        return a != b and count[frozenset((a, b))] == 1 and not _frame_edge(deg(a), deg(b))

    seen: set = set()

    def border(a, b):  # each shared edge drawn once
        e = frozenset((a, b))
        if a == b or count[e] < 2 or e in seen:
            return False
        seen.add(e)
        return True

    flat = lambda lines: [[int(v) for p in line for v in p] for line in lines if len(line) > 1]  # noqa: E731
    return {**_PROVENANCE, "coastline": flat(_chains(rings, coast)), "borders": flat(_chains(rings, border))}


def write_outline_asset(shapefile: str, out: str) -> dict:
    """Derive the outline from ``shapefile`` and write it as compact JSON to ``out``; returns it."""
    doc = outline_from_shapefile(shapefile)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"))
        fh.write("\n")
    return doc


@functools.lru_cache(maxsize=1)
def load_outline(path: str = OUTLINE_ASSET) -> dict[str, list[np.ndarray]]:
    """The bundled outline: {"coastline": [(K, 2) float64 (lon, lat) degrees …], "borders": [...]}."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the world outline asset {path} ({exc}); reinstall geopipe") from None
    return {k: [np.asarray(line, dtype=np.float64).reshape(-1, 2) / 100.0 for line in doc[k]] for k in ("coastline", "borders")}


if __name__ == "__main__":  # pragma: no cover - asset rebuild helper
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m geopipe.pipeline.viz.land_outline NATURALEARTH_LOWRES.shp OUT.json")
    d = write_outline_asset(sys.argv[1], sys.argv[2])
    print(f"{len(d['coastline'])} coastline and {len(d['borders'])} border polylines → {sys.argv[2]}")

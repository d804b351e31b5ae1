"""A small place-recognition dataset in the VPR-datasets-downloader layout, generated:
``<root>/images/test/{database,queries}/@east@north@zone@letter@lat@lon@pano@tile@heading@@@@ts@@.jpg``.

Places on a 60 m grid in UTM zone 17T (Pittsburgh); positions are chosen in UTM and converted to
lat/lon by geopipe's own series (names carry both, some database names only UTM). Each place
has a texture; its database views (different panoramas, same 10 m cell, headings in one 30°
bin) are the texture panned and noised; its query stands 0–20 m away and is noisier by a
per-place difficulty d, and with probability d shows another place (a wrong top-1 that the
uncertainty scores should flag). Query 0 stands exactly 25.00 m from place 0 (a positive, the
inclusive boundary), query 1 25.01 m from place 1 (no positive), and ``n_unanswerable`` extra
queries stand 42 m from every database image. Three badly named files join the database.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from geopipe.pipeline.vpr.utm import utm_to_latlon

BAD_NAMES = ("holiday_photo.jpg", "@abc@4477000.00@17@T@@@p@@@@@@@@.jpg", "@584000.00@4477000.00@@@@@p@@@@@@@@.jpg")


@dataclass(frozen=True)
class VprDatasetConfig:
    n_places: int = 50
    views: int = 3
    n_unanswerable: int = 5
    size: int = 32
    seed: int = 0
    east0: float = 584005.0  # place centres mid-cell: the views of a place share its CosPlace 10 m cell
    north0: float = 4477005.0
    spacing_m: float = 60.0


def _coord(v: float, left: int, right: int) -> str:
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v):0{left - len(sign) + right + 1}.{right}f}"


def _name(e: float, n: float, pano: str, heading: float | None, with_latlon: bool = True, ts: str = "") -> str:
    lat, lon = (float(x) for x in utm_to_latlon(e, n, 17, "T"))
    ll = f"{_coord(lat, 3, 5)}@{_coord(lon, 4, 5)}" if with_latlon else "@"
    head = "" if heading is None else f"{int(heading):03d}"
    return f"@{_coord(e, 7, 2)}@{_coord(n, 7, 2)}@17@T@{ll}@{pano}@@{head}@@@@{ts}@@.jpg"


def _texture(rng, size: int) -> np.ndarray:
    small = rng.uniform(0, 1, (6, 6, 3))
    return np.kron(small, np.ones((size // 6 + 1, size // 6 + 1, 1)))[:size, :size]


def _save(path: str, img: np.ndarray) -> None:
    Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, quality=95)


def write_vpr_dataset(root: str, cfg: VprDatasetConfig = VprDatasetConfig()) -> dict:
    """Write the dataset; returns {"database", "queries" (folders), "db_utm", "q_utm" (arrays in
    the order of the sorted file names), "difficulty", "n_bad"}."""
    rng = np.random.default_rng(cfg.seed)
    db_dir, q_dir = (os.path.join(root, "images", "test", f) for f in ("database", "queries"))
    os.makedirs(db_dir, exist_ok=True)
    os.makedirs(q_dir, exist_ok=True)
    side = int(np.ceil(np.sqrt(cfg.n_places)))
    textures = [_texture(rng, cfg.size) for _ in range(cfg.n_places)]
    difficulty = rng.uniform(0, 1, cfg.n_places)
    difficulty[:2] = 0.0
    db, q = {}, {}
    for p in range(cfg.n_places):
        e0 = round(cfg.east0 + cfg.spacing_m * (p % side), 2)
        n0 = round(cfg.north0 + cfg.spacing_m * (p // side), 2)
        h0 = 30.0 * rng.integers(0, 12) + 2.0
        for v in range(cfg.views):
            jit = np.zeros(2) if p < 2 else np.round(rng.uniform(-3, 3, 2), 2)
            e, n = round(e0 + jit[0], 2), round(n0 + jit[1], 2)
            img = np.roll(textures[p], 2 * v, axis=1) + rng.normal(0, 0.04, textures[p].shape)
            name = _name(e, n, f"pano{p:03d}v{v}", h0 + 8 * v, with_latlon=(p + v) % 4 != 0, ts="201907")
            _save(os.path.join(db_dir, name), img)
            db[name] = (e, n)
        off = {0: (15.0, 20.0), 1: (15.0, 20.01)}.get(p, tuple(np.round(rng.uniform(-14, 14, 2), 2)))
        shown = textures[p] if rng.uniform() >= difficulty[p] else textures[(p + 7) % cfg.n_places]
        img = shown + rng.normal(0, 0.04 + 0.35 * difficulty[p], shown.shape)
        name = _name(round(e0 + off[0], 2), round(n0 + off[1], 2), f"query{p:03d}", None, ts="20210512_1030")
        _save(os.path.join(q_dir, name), img)
        q[name] = (round(e0 + off[0], 2), round(n0 + off[1], 2))
    for u in range(cfg.n_unanswerable):  # cell centres between places: 42.4 m from the nearest
        e = round(cfg.east0 + cfg.spacing_m * (u + 0.5), 2)
        n = round(cfg.north0 + cfg.spacing_m * 0.5, 2)
        name = _name(e, n, f"lost{u}", None)
        _save(os.path.join(q_dir, name), textures[u] + rng.normal(0, 0.3, textures[u].shape))
        q[name] = (e, n)
    for bad in BAD_NAMES:
        _save(os.path.join(db_dir, bad), textures[0])
    return {"database": db_dir, "queries": q_dir, "db_utm": np.array([db[k] for k in sorted(db)]),
            "q_utm": np.array([q[k] for k in sorted(q)]), "difficulty": difficulty, "n_bad": len(BAD_NAMES)}

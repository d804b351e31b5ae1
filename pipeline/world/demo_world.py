"""A synthetic, offline "world" of geotagged images written as WebDataset shards.

Locations come from a mixture of named regions (great-circle Gaussian spreads of 50–800 km
around real-ish places), diffuse land-ish points, and ~10 % featureless images at uniform
locations on the sphere. Images carry location signal a random ViT can pick up:

* palette and sky height follow the climate band, a smooth function of |latitude|
  (tropics dark green, subtropics sand, temperate green, boreal, polar white);
* stripe orientation follows longitude (angle = (lon + 180°)/360° · π, continuous across the
  date line because stripes are π-periodic); stripe frequency and blobs follow the continent;
* sky tint tells the hemisphere, except for three *twin* region pairs in opposite hemispheres
  that are rendered identically (deliberate ambiguity → bimodal posteriors);
* a few sites draw a landmark shape (tower, pyramid, cross, disc, sails).

Everything is deterministic given ``DemoWorldConfig.seed`` (same bytes on the same
numpy/Pillow build); train and test use independent random streams. numpy + Pillow only.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from geopipe.pipeline.core.errors import ConfigError, check_int
from geopipe.pipeline.ingest.shards import write_shards

__all__ = ["DemoWorldConfig", "DemoWorldResult", "write_demo_world"]

_EARTH_RADIUS_KM = 6371.0088  # = geopipe.pipeline.sphere.geometry.EARTH_RADIUS_KM (not imported: keeps torch out)
_P_REGION, _P_DIFFUSE = 0.65, 0.25  # the remaining 0.10 are featureless
_SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")

# name, synthetic country, lat, lon (degrees), spread (km), weight, landmark, twin-style key
_REGIONS: tuple[tuple[str, str, float, float, float, float, str | None, str | None], ...] = (
    ("paris_basin", "Francia", 48.86, 2.35, 120, 1.0, "tower", None),
    ("nile_delta", "Aegyptus", 30.05, 31.24, 150, 1.0, "pyramid", None),
    ("sahara", "Saharia", 23.0, 5.0, 800, 1.0, None, None),
    ("amazonia", "Amazonia", -3.5, -62.0, 700, 1.0, None, None),
    ("guanabara", "Guanabara", -22.9, -43.2, 60, 0.8, "cross", None),
    ("pampas", "Pampa", -34.6, -60.0, 400, 1.0, None, "plains"),
    ("great_plains", "Prairia", 38.5, -98.0, 500, 1.0, None, "plains"),
    ("cape", "Capensis", -33.9, 18.4, 150, 0.8, None, "mediterranean"),
    ("catalonia", "Iberia", 41.4, 2.2, 150, 0.8, None, "mediterranean"),
    ("southern_alps", "Aotearoa", -43.5, 171.0, 250, 0.8, None, "highlands"),
    ("highlands", "Caledonia", 57.0, -4.5, 200, 0.8, None, "highlands"),
    ("kanto", "Yamato", 35.7, 139.7, 80, 1.0, "disc", None),
    ("ganges", "Gangetica", 26.0, 82.0, 500, 1.0, None, None),
    ("taiga", "Sibiria", 60.0, 100.0, 800, 1.0, None, None),
    ("port_jackson", "Eora", -33.87, 151.2, 50, 0.8, "sails", None),
    ("outback", "Australis", -25.0, 134.0, 700, 1.0, None, None),
    ("congo", "Congolia", -1.0, 22.0, 500, 1.0, None, None),
    ("kalaallit", "Kalaallit", 67.0, -48.0, 400, 0.7, None, None),
)
# lat_min, lat_max, lon_min, lon_max, synthetic country of diffuse land-ish points
_LAND_BOXES = (
    (25, 60, -125, -70, "Terra Borealis"), (-40, 5, -75, -40, "Terra Australis Occidentalis"),
    (40, 60, -5, 40, "Terra Europaea"), (-30, 30, -10, 45, "Terra Africana"),
    (20, 60, 60, 130, "Terra Asiatica"), (-35, -15, 115, 150, "Terra Oceanica"),
)
# |lat| anchor, biome, two ground colours (RGB); palettes are interpolated in |lat|
_BIOMES = (
    (0, "tropical", (25, 85, 30), (75, 60, 25)), (15, "savanna", (150, 140, 60), (90, 110, 40)),
    (25, "desert", (225, 195, 110), (190, 150, 80)), (38, "mediterranean", (115, 150, 60), (175, 150, 95)),
    (50, "temperate", (60, 125, 50), (95, 100, 70)), (62, "boreal", (35, 80, 50), (150, 150, 140)),
    (75, "polar", (235, 240, 245), (185, 195, 215)), (90, "polar", (245, 248, 250), (200, 210, 225)),
)
# continent -> (stripe cycles per image, number of blobs, blob colour)
_CONTINENTS = {
    "americas": (2.5, 0, (0, 0, 0)), "europe": (6.0, 2, (170, 60, 50)), "africa": (1.5, 4, (120, 70, 30)),
    "asia": (9.0, 1, (200, 200, 60)), "oceania": (4.0, 6, (200, 90, 40)),
}


@dataclass(frozen=True)
class DemoWorldConfig:
    """Size and seed of the demo world. image_size in pixels (square JPEGs). views_per_place > 1
    makes a multi-view world: each sampled place is photographed that many times (same style,
    fresh texture noise, the picture panned with the heading), with metadata place_id,
    capture_id (one per view) and heading_deg, so viewpoint pairs exist; 1 (default) writes the
    single-view world byte for byte as before. test_views_per_place: the test split's own views
    per place (None: views_per_place), e.g. 1 for single-view queries against a multi-view
    database."""

    n_train: int = 3000
    n_test: int = 500
    shard_size: int = 500
    image_size: int = 64
    seed: int = 0
    views_per_place: int = 1
    test_views_per_place: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("n_train", 1), ("n_test", 0), ("shard_size", 1), ("image_size", 1), ("seed", 0),
                          ("views_per_place", 1)):
            check_int(getattr(self, name), name, low, where="DemoWorldConfig")
        if self.test_views_per_place is not None:
            check_int(self.test_views_per_place, "test_views_per_place", 1, where="DemoWorldConfig")
        if self.image_size < 16:
            raise ConfigError(f"DemoWorldConfig.image_size must be >= 16 pixels, got {self.image_size}")


@dataclass(frozen=True)
class DemoWorldResult:
    """Shard paths written (in order), sample counts, and the manifest (config + region table)."""

    out_dir: str
    train_shards: tuple[str, ...]
    test_shards: tuple[str, ...]
    n_train: int
    n_test: int
    n_featureless: int
    manifest: str


def write_demo_world(out_dir: str | os.PathLike, cfg: DemoWorldConfig | None = None) -> DemoWorldResult:
    """Render the demo world into ``out_dir`` (train-*.tar, test-*.tar, manifest.json).

    Existing ``train-NNNNNN.tar`` / ``test-NNNNNN.tar`` files in ``out_dir`` are replaced
    (stale ones from a larger earlier world are removed). Each sample: ``__key__`` like
    ``train_00000123``; ``jpg``; ``json`` = {latitude, longitude (degrees), country, region,
    biome, split}. Returns paths and counts.
    """
    cfg = cfg or DemoWorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        if _SHARD_RE.match(old.name):
            old.unlink()
    train_ss, test_ss = np.random.SeedSequence(cfg.seed).spawn(2)
    grid = np.mgrid[0 : cfg.image_size, 0 : cfg.image_size].astype(np.float64) / cfg.image_size
    counts = {"featureless": 0}
    shards = {}
    for split, n, ss in (("train", cfg.n_train, train_ss), ("test", cfg.n_test, test_ss)):
        views = cfg.test_views_per_place if split == "test" and cfg.test_views_per_place is not None else cfg.views_per_place
        samples = _split_samples(split, n, np.random.default_rng(ss), grid, counts, views)
        shards[split] = tuple(write_shards(out, samples, split, cfg.shard_size))
    manifest = out / "manifest.json"
    regions = [dict(zip(("region", "country", "latitude", "longitude", "spread_km", "weight", "landmark", "twin"), r))
               for r in _REGIONS]
    config = asdict(cfg)
    if cfg.views_per_place == 1:
        del config["views_per_place"]  # the single-view manifest stays byte-identical to earlier versions
    if cfg.test_views_per_place is None:
        del config["test_views_per_place"]
    manifest.write_text(json.dumps({"config": config, "regions": regions}, indent=1, sort_keys=True))
    return DemoWorldResult(str(out), shards["train"], shards["test"], cfg.n_train, cfg.n_test,
                           counts["featureless"], str(manifest))


# --------------------------------------------------------------------------- private


def _split_samples(split: str, n: int, rng: np.random.Generator, grid: np.ndarray, counts: dict, views: int = 1):
    """Yield n samples; one rng stream per split, consumed in sample order."""
    if views > 1:
        yield from _multi_view_samples(split, n, rng, grid, counts, views)
        return
    weights = np.array([r[5] for r in _REGIONS])
    weights = weights / weights.sum()
    twins = {r[7]: r for r in reversed(_REGIONS) if r[7]}  # twin key -> first member (style source)
    for i in range(n):
        lat, lon, country, name, biome, style, landmark = _place(rng, weights, twins)
        if style is None:
            img = _featureless(rng, grid.shape[1])
            counts["featureless"] += 1
        else:
            img = _render(style, rng, grid, landmark)
        meta = {"latitude": round(float(lat), 6), "longitude": round(float(lon), 6), "country": country,
                "region": name, "biome": biome, "split": split}
        yield {"__key__": f"{split}_{i:08d}", "jpg": _jpeg(img), "json": meta}


def _place(rng: np.random.Generator, weights: np.ndarray, twins: dict) -> tuple:
    """One place of the world: (lat, lon, country, region, biome, style or None, landmark)."""
    u = rng.random()
    if u < _P_REGION:
        name, country, lat0, lon0, spread, _, landmark, twin = _REGIONS[rng.choice(len(_REGIONS), p=weights)]
        east, north = rng.normal(size=2)
        lat, lon = _destination(lat0, lon0, math.atan2(east, north), spread * math.hypot(east, north))
        src = twins[twin] if twin else (None, None, lat0, lon0)
        style = _style(src[2], src[3], jitter=(float(np.clip(east, -2, 2)), float(np.clip(north, -2, 2))))
        return lat, lon, country, name, _biome(lat0), style, landmark if rng.random() < 0.7 else None
    if u < _P_REGION + _P_DIFFUSE:
        la0, la1, lo0, lo1, country = _LAND_BOXES[rng.integers(len(_LAND_BOXES))]
        lat, lon = rng.uniform(la0, la1), rng.uniform(lo0, lo1)
        return lat, lon, country, "diffuse_" + _continent(lat, lon), _biome(lat), _style(lat, lon, jitter=(0.0, 0.0)), None
    lat, lon = math.degrees(math.asin(rng.uniform(-1, 1))), rng.uniform(-180, 180)
    return lat, lon, "Nullland", "featureless", "unknown", None, None


def _multi_view_samples(split: str, n: int, rng: np.random.Generator, grid: np.ndarray, counts: dict, views: int):
    """n samples in groups of ``views`` photos of one place: positions within ~3 m, headings
    ~30° apart from a random start, each view its own capture."""
    weights = np.array([r[5] for r in _REGIONS])
    weights = weights / weights.sum()
    twins = {r[7]: r for r in reversed(_REGIONS) if r[7]}
    size = grid.shape[1]
    i = place = 0
    while i < n:
        lat, lon, country, name, biome, style, landmark = _place(rng, weights, twins)
        h0 = float(rng.uniform(0, 360))
        for v in range(min(views, n - i)):
            heading = (h0 + 30.0 * v + float(rng.uniform(-5, 5))) % 360.0
            vlat, vlon = _destination(lat, lon, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 0.003)))
            if style is None:
                img = _featureless(rng, size)
                counts["featureless"] += 1
            else:
                img = np.roll(_render(style, rng, grid, landmark), int(round(heading / 360.0 * size)), axis=1)
            meta = {"latitude": round(vlat, 7), "longitude": round(vlon, 7), "country": country, "region": name,
                    "biome": biome, "split": split, "place_id": f"{split}_p{place:07d}", "capture_id": f"{split}_{i:08d}",
                    "heading_deg": round(heading, 2)}
            yield {"__key__": f"{split}_{i:08d}", "jpg": _jpeg(img), "json": meta}
            i += 1
        place += 1


def _destination(lat: float, lon: float, bearing: float, dist_km: float) -> tuple[float, float]:
    """Great-circle destination from (lat, lon) degrees, bearing radians from north, distance km."""
    p1, l1, d = math.radians(lat), math.radians(lon), dist_km / _EARTH_RADIUS_KM
    p2 = math.asin(max(-1.0, min(1.0, math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(bearing))))
    l2 = l1 + math.atan2(math.sin(bearing) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 180.0) % 360.0 - 180.0


def _continent(lat: float, lon: float) -> str:
    if lon < -30:
        return "americas"
    if lon < 60:
        return "europe" if lat >= 35 else "africa"
    return "oceania" if (lon >= 110 and lat < -10) else "asia"


def _biome(lat: float) -> str:
    anchors = [a for a in _BIOMES if a[0] <= abs(lat)]
    return anchors[-1][1]


def _style(lat: float, lon: float, jitter: tuple[float, float]) -> dict:
    """Rendering parameters for a location; jitter = (east, north) offset in units of the region spread."""
    a = abs(lat)
    ks = [b[0] for b in _BIOMES]
    c1 = np.array([np.interp(a, ks, [b[2][c] for b in _BIOMES]) for c in range(3)])
    c2 = np.array([np.interp(a, ks, [b[3][c] for b in _BIOMES]) for c in range(3)])
    freq, n_blobs, blob = _CONTINENTS[_continent(lat, lon)]
    sky = np.array((110, 160, 230) if lat >= 0 else (170, 130, 210), dtype=np.float64)
    sky = sky + (255 - sky) * (a / 90.0) * 0.6  # paler skies toward the poles
    return {"c1": c1 + 10 * jitter[1], "c2": c2 - 10 * jitter[1], "freq": freq, "n_blobs": n_blobs,
            "blob": np.array(blob, dtype=np.float64), "sky": sky, "sky_h": 0.12 + 0.3 * a / 90.0,
            "angle": (lon + 180.0) / 360.0 * math.pi + 0.2 * jitter[0]}


def _render(style: dict, rng: np.random.Generator, grid: np.ndarray, landmark: str | None) -> np.ndarray:
    yy, xx = grid
    size = yy.shape[0]
    proj = xx * math.cos(style["angle"]) + yy * math.sin(style["angle"])
    s = np.clip((np.sin(2 * math.pi * style["freq"] * proj + rng.uniform(0, 2 * math.pi)) * 1.5 + 1) / 2, 0, 1)
    img = style["c1"] * (1 - s[..., None]) + style["c2"] * s[..., None]
    for _ in range(style["n_blobs"]):
        cy, cx, r = rng.uniform(0.3, 1.0), rng.uniform(0, 1), rng.uniform(0.05, 0.14)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = style["blob"]
    img[yy < style["sky_h"] + rng.uniform(-0.04, 0.04)] = style["sky"]
    img = img * rng.uniform(0.88, 1.12) + rng.normal(0, 6, size=img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    if landmark is not None:
        _draw_landmark(ImageDraw.Draw(pil), landmark, size, rng)
    return np.asarray(pil)


def _draw_landmark(draw: ImageDraw.ImageDraw, kind: str, size: int, rng: np.random.Generator) -> None:
    h = size * rng.uniform(0.35, 0.6)
    x, base = size * rng.uniform(0.25, 0.75), size * rng.uniform(0.85, 0.98)
    if kind == "tower":
        draw.polygon([(x - h / 5, base), (x, base - h), (x + h / 5, base)], fill=(60, 50, 45))
        draw.line([(x - h / 7, base - h / 3), (x + h / 7, base - h / 3)], fill=(60, 50, 45), width=2)
    elif kind == "pyramid":
        draw.polygon([(x - h * 0.7, base), (x, base - h * 0.7), (x + h * 0.7, base)], fill=(150, 105, 55))
        draw.polygon([(x, base - h * 0.7), (x + h * 0.7, base), (x + h * 0.2, base)], fill=(230, 200, 140))
    elif kind == "cross":
        draw.rectangle([x - h / 16, base - h, x + h / 16, base], fill=(235, 235, 230))
        draw.rectangle([x - h / 3, base - h * 0.8, x + h / 3, base - h * 0.7], fill=(235, 235, 230))
    elif kind == "disc":
        draw.ellipse([x - h / 3, base - h, x + h / 3, base - h / 3], fill=(210, 30, 40))
    elif kind == "sails":
        for k in range(3):
            dx = (k - 1) * h / 3
            box = [x + dx - h / 3, base - h * 0.8, x + dx + h / 3, base + h * 0.4]
            draw.pieslice(box, 180, 270, fill=(245, 245, 240))


def _featureless(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), rng.uniform(90, 170)) + rng.normal(0, 10, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()

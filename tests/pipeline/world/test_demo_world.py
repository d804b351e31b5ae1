"""Demo world shards: determinism, layout, valid metadata, decodable images, location signal."""

from __future__ import annotations

import io
import json
import math
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geopipe.pipeline.ingest.shards import write_shards
from geopipe.pipeline.world.demo_world import DemoWorldConfig, write_demo_world

CFG = DemoWorldConfig(n_train=600, n_test=150, shard_size=256, image_size=64, seed=3)


def _members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _samples(paths) -> list[dict]:
    """Group tar members into samples by key (WebDataset convention: key = name up to first '.')."""
    out: dict[str, dict] = {}
    for path in paths:
        for name, data in _members(path).items():
            key, ext = name.split(".", 1)
            out.setdefault(key, {"__key__": key})[ext] = data
    return list(out.values())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    result = write_demo_world(out, CFG)
    return result, _samples(result.train_shards), _samples(result.test_shards)


def test_counts_and_shard_names(world):
    result, train, test = world
    assert [Path(p).name for p in result.train_shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert [Path(p).name for p in result.test_shards] == ["test-000000.tar"]
    assert len(train) == result.n_train == CFG.n_train and len(test) == result.n_test == CFG.n_test
    assert [len(_samples([p])) for p in result.train_shards] == [256, 256, 88]
    regions = Counter(json.loads(s["json"])["region"] for s in train + test)
    assert regions["featureless"] == result.n_featureless
    assert 0.05 < result.n_featureless / (CFG.n_train + CFG.n_test) < 0.16
    assert sum(n for r, n in regions.items() if r.startswith("diffuse_")) > 0.15 * (CFG.n_train + CFG.n_test)
    assert len([r for r in regions if not r.startswith("diffuse_")]) >= 13  # most named regions appear
    manifest = json.loads(Path(result.manifest).read_text())
    assert manifest["config"]["seed"] == CFG.seed and len(manifest["regions"]) >= 12


def test_keys_unique_and_json_valid(world):
    _, train, test = world
    keys = [s["__key__"] for s in train + test]
    assert len(set(keys)) == len(keys)
    for split, samples in (("train", train), ("test", test)):
        for s in samples:
            assert set(s) == {"__key__", "jpg", "json"}
            assert re.fullmatch(rf"{split}_\d{{8}}", s["__key__"])
            meta = json.loads(s["json"])
            assert set(meta) == {"latitude", "longitude", "country", "region", "biome", "split"}
            assert meta["split"] == split
            assert -90.0 <= meta["latitude"] <= 90.0 and -180.0 <= meta["longitude"] < 180.0
            assert all(isinstance(meta[k], str) and meta[k] for k in ("country", "region", "biome"))


def test_images_decode(world):
    _, train, test = world
    for s in train[:50] + test[:50]:
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
        img.load()


def test_deterministic_bytes_and_seed_matters(world, tmp_path):
    result, _, _ = world
    small = DemoWorldConfig(n_train=40, n_test=10, shard_size=16, seed=CFG.seed)
    stale = tmp_path / "a" / "train-000099.tar"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    a = write_demo_world(tmp_path / "a", small)
    b = write_demo_world(tmp_path / "b", small)
    assert not stale.exists()  # stale shards from an earlier, larger world are removed
    for pa, pb in zip(a.train_shards + a.test_shards, b.train_shards + b.test_shards, strict=True):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    # the test split does not depend on n_train: it has its own random stream
    first_big = _samples(result.test_shards)[: small.n_test]
    assert [s["jpg"] for s in _samples(a.test_shards)] == [s["jpg"] for s in first_big]
    c = write_demo_world(tmp_path / "c", DemoWorldConfig(n_train=40, n_test=10, shard_size=16, seed=CFG.seed + 1))
    assert Path(c.train_shards[0]).read_bytes() != Path(a.train_shards[0]).read_bytes()


def _colour_table(samples):
    rows = []
    for s in samples:
        meta = json.loads(s["json"])
        rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
        rows.append((meta["region"], abs(meta["latitude"]), rgb))
    return rows


def test_mean_colour_carries_latitude_signal(world):
    _, train, test = world
    rows = [r for r in _colour_table(train + test) if r[0] != "featureless"]
    absl = np.array([r[1] for r in rows])
    rgb = np.array([r[2] for r in rows])
    assert np.corrcoef(rgb.mean(axis=1), absl)[0, 1] > 0.2  # snow and desert bright, tropics dark
    design = np.c_[np.ones(len(rgb)), rgb]
    beta, *_ = np.linalg.lstsq(design, absl, rcond=None)
    r2 = 1.0 - np.var(absl - design @ beta) / np.var(absl)
    assert r2 > 0.4, f"|latitude| explained by mean RGB: R² = {r2:.3f}"
    feat = [r for r in _colour_table(train + test) if r[0] == "featureless"]
    grey = np.array([r[2] for r in feat])
    assert np.abs(grey - grey.mean(axis=1, keepdims=True)).max() < 8.0  # featureless = grey, no hue


def _style_features(jpg: bytes) -> np.ndarray:
    """Sky colour, ground colour and ground stripe orientation (structure tensor, π-periodic)."""
    a = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float64)
    gy, gx = np.gradient(a[36:].mean(axis=2))
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    return np.r_[a[:4].mean(axis=(0, 1)) / 255, a[36:].mean(axis=(0, 1)) / 255,
                 (jxx - jyy) / (jxx + jyy), 2 * jxy / (jxx + jyy)]


def _loo_nearest_centroid_accuracy(a: np.ndarray, b: np.ndarray) -> float:
    x, y = np.r_[a, b], np.r_[np.zeros(len(a)), np.ones(len(b))]
    hits = 0
    for i in range(len(x)):
        rest = np.arange(len(x)) != i
        d0 = np.linalg.norm(x[i] - x[rest & (y == 0)].mean(axis=0))
        d1 = np.linalg.norm(x[i] - x[rest & (y == 1)].mean(axis=0))
        hits += (d1 < d0) == bool(y[i])
    return hits / len(x)


def test_twin_regions_are_indistinguishable_others_are_not(world):
    _, train, test = world
    by_region: dict[str, list] = {}
    for s in train + test:
        by_region.setdefault(json.loads(s["json"])["region"], []).append(_style_features(s["jpg"]))
    f = {r: np.array(v) for r, v in by_region.items()}
    twins = [("pampas", "great_plains"), ("cape", "catalonia"), ("southern_alps", "highlands")]
    twin_acc = np.mean([_loo_nearest_centroid_accuracy(f[a], f[b]) for a, b in twins])
    other_acc = np.mean([_loo_nearest_centroid_accuracy(f[a], f[b]) for a, b in
                         [("highlands", "taiga"), ("pampas", "amazonia"), ("sahara", "congo")]])
    assert twin_acc < 0.7, f"twin regions separable: accuracy {twin_acc:.2f}"
    assert other_acc > 0.9, f"distinct regions not separable: accuracy {other_acc:.2f}"


def test_write_shards_keeps_broken_samples_as_given(tmp_path):
    samples = [
        {"__key__": "ok", "jpg": b"\xff\xd8 not really a jpeg", "json": {"latitude": 1.5, "longitude": 2.0}},
        {"__key__": "nojson", "jpg": b"abc"},
        {"__key__": "badjson", "json": b"{not json"},
        {"__key__": "nanlat", "json": {"latitude": math.nan, "longitude": 0.0}},
        {"json": "{}", "npy": np.arange(3, dtype=np.float32)},
    ]
    paths = write_shards(tmp_path, samples, "bad", shard_size=2)
    assert [Path(p).name for p in paths] == ["bad-000000.tar", "bad-000001.tar", "bad-000002.tar"]
    members = {}
    for p in paths:
        members.update(_members(p))
    assert members["ok.jpg"] == b"\xff\xd8 not really a jpeg"
    assert json.loads(members["ok.json"]) == {"latitude": 1.5, "longitude": 2.0}
    assert "nojson.json" not in members and members["badjson.json"] == b"{not json"
    assert math.isnan(json.loads(members["nanlat.json"])["latitude"])
    assert np.load(io.BytesIO(members["bad_00000004.npy"])).tolist() == [0.0, 1.0, 2.0]
    assert write_shards(tmp_path / "empty", [], "x", 5) == []
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("samples, shard_size, match", [
    ([{"__key__": "a.b", "jpg": b""}], 4, "without '.'"),
    ([{"__key__": "a", "jpg": 3}], 4, "cannot encode"),
    (["not a dict"], 4, "must be a dict"),
    ([{"__key__": "a"}], 0, "shard_size"),
])
def test_write_shards_rejects_bad_input(tmp_path, samples, shard_size, match):
    with pytest.raises(ValueError, match=match):
        write_shards(tmp_path, samples, "bad", shard_size)
    assert not list(tmp_path.glob("*.tar*"))


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(shard_size=-1), dict(image_size=8), dict(seed=True)])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match="DemoWorldConfig"):
        DemoWorldConfig(**kwargs)

"""The geoclip world's recipe on a small fake gallery and a small random location encoder (GeoCLIP's
interface); the real weights only where the geoclip package is installed."""

import importlib.util
import math

import numpy as np
import pytest
from click.testing import CliRunner

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.retrieval.split import decode_meta
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.world import location_encoder as le
from geopipe.pipeline.world.geoclip import GeoclipWorldConfig, plan_world, to_xyz
from geopipe.pipeline.world.geoclip_stores import write_geoclip_world

CFG = GeoclipWorldConfig(n_train=700, n_val=120, n_test=120, n_heldout=60, samples=8, noise=0.3)


def _gallery(seed=0, n=4000):
    """Clustered photo locations (cities with near-duplicates), scattered ones, and a patch of New Zealand."""
    rng = np.random.default_rng(seed)
    centres = np.column_stack([rng.uniform(-60, 70, 60), rng.uniform(-170, 160, 60)])
    c = centres[rng.integers(0, 60, n // 2)]
    spread = np.exp(rng.uniform(math.log(0.002), math.log(0.5), (n // 2, 1)))
    city = c + rng.normal(size=(n // 2, 2)) * spread
    scattered = np.column_stack([np.rad2deg(np.arcsin(rng.uniform(-0.95, 0.95, n // 2 - 150))), rng.uniform(-180, 160, n // 2 - 150)])
    nz = np.column_stack([rng.uniform(-46, -36, 150), rng.uniform(167, 178, 150)])
    g = np.vstack([city, scattered, nz])
    g[:, 1] = (g[:, 1] + 180) % 360 - 180
    g[:, 0] = np.clip(g[:, 0], -89, 89)
    return g


def _km(a, b):
    return np.arccos(np.clip(to_xyz(a) @ to_xyz(b).T, -1, 1)) * 6371.0088


def decode_column(store, name):
    return decode_meta(store.meta[name][:])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("gw")
    gallery = _gallery()
    res = write_geoclip_world(str(out), CFG, le.random_location_encoder(0), gallery, progress=False)
    return res, gallery


def test_splits_never_straddle_and_the_heldout_region_is_only_heldout(world):
    res, gallery = world
    stores = {s: open_store(p) for s, p in res.stores.items()}
    assert {s: len(st) for s, st in stores.items()} == {"train": 700, "val": 120, "test": 120, "heldout": 60}
    ll = {s: st.latlon[:].astype(np.float64) for s, st in stores.items()}
    for a in ("val", "test"):  # near-duplicates (≤ dup_km) never on both sides; float16-free: latlon is float64 in the store
        assert _km(ll[a], ll["train"]).min() > CFG.dup_km
    assert _km(ll["val"], ll["test"]).min() > CFG.dup_km
    la0, la1, lo0, lo1 = CFG.heldout_box
    inside = lambda x: (x[:, 0] >= la0) & (x[:, 0] <= la1) & (x[:, 1] >= lo0) & (x[:, 1] <= lo1)  # noqa: E731
    assert not any(inside(ll[s]).any() for s in ("train", "val", "test"))
    assert inside(ll["heldout"]).all()
    # no train record's kernel snaps to the held-out region
    plan = plan_world(gallery, CFG)
    train_samples = gallery[plan.sample_index[plan.split == 0].ravel()]
    assert not inside(train_samples).any()


def test_radii_span_log_uniform_range_and_embeddings_carry_them(world):
    res, gallery = world
    st = open_store(res.stores["train"])
    r = np.array(decode_column(st, "radius_km"), dtype=np.float64)
    assert r.min() >= CFG.radius_min_km and r.max() <= CFG.radius_max_km
    assert r.min() < 2.0 and r.max() > 1500.0
    assert abs(np.mean(r < math.sqrt(CFG.radius_min_km * CFG.radius_max_km)) - 0.5) < 0.07  # log-uniform: median at the geometric mean
    # the embedding of a sharp record is close to the encoder's output at its truth, a broad one's is not
    truth = le.encode_locations(le.random_location_encoder(0), st.latlon[:].astype(np.float64))
    cos = np.sum(truth * st.embeddings[:].astype(np.float32), axis=1)
    sharp, broad = cos[r < 10].mean(), cos[r > 500].mean()
    assert sharp > broad + 0.1, (sharp, broad)
    mixed = np.array(decode_column(st, "mixed"), dtype=bool)
    assert 0.04 < mixed.mean() < 0.18
    plat = np.array([v for v in decode_column(st, "partner_lat") if v is not None])
    plon = np.array([v for v in decode_column(st, "partner_lon") if v is not None])
    d = np.diag(_km(st.latlon[:].astype(np.float64)[mixed], np.column_stack([plat, plon])))
    assert d.min() >= CFG.mix_min_km - 1e-6
    assert st.attrs["backbone"]["name"].startswith("geoclip-world/v1[random-location@seed0")


def test_same_seed_reproduces_and_the_cache_and_stamp_are_used(world, tmp_path):
    res, gallery = world
    again = write_geoclip_world(str(tmp_path / "a"), CFG, le.random_location_encoder(0), gallery, progress=False)
    a, b = open_store(res.stores["test"]), open_store(again.stores["test"])
    np.testing.assert_array_equal(a.embeddings[:], b.embeddings[:])
    np.testing.assert_array_equal(a.latlon[:], b.latlon[:])
    assert write_geoclip_world(str(tmp_path / "a"), CFG, le.random_location_encoder(0), gallery, progress=False).skipped
    other = GeoclipWorldConfig(**{**CFG.__dict__, "seed": 1})
    res1 = write_geoclip_world(str(tmp_path / "a"), other, le.random_location_encoder(0), gallery, progress=False)
    assert not res1.skipped and res1.encoded < again.encoded  # the cache held the points both seeds use
    c = open_store(res1.stores["test"])
    assert len(c) == 120 and not np.array_equal(c.latlon[:], a.latlon[:])
    assert c.attrs["backbone"] != a.attrs["backbone"]  # the seed is part of the recipe's identity


def test_config_and_size_errors(tmp_path):
    with pytest.raises(ConfigError, match="radius_min_km"):
        GeoclipWorldConfig(radius_min_km=0.0)
    with pytest.raises(ConfigError, match="n_train"):
        GeoclipWorldConfig(n_train=0)
    with pytest.raises(ConfigError, match="fewer than n_train"):
        plan_world(_gallery(n=400), GeoclipWorldConfig(n_train=5000, n_val=10, n_test=10))
    (tmp_path / "w" / "train.zarr").mkdir(parents=True)
    with pytest.raises(GeopipeError, match="not written by demo-data --world geoclip"):
        write_geoclip_world(str(tmp_path / "w"), CFG, le.random_location_encoder(0), _gallery(), progress=False)


def test_cli_writes_the_world_with_the_encoder_it_finds(tmp_path, monkeypatch):
    from geopipe.flows.cli import cli

    gallery = _gallery()
    monkeypatch.setattr(le, "geoclip_dir", lambda: str(tmp_path))
    monkeypatch.setattr(le, "load_geoclip_encoder", lambda folder=None: le.random_location_encoder(3))
    monkeypatch.setattr(le, "load_gallery", lambda folder=None: gallery)
    r = CliRunner().invoke(cli, ["--quiet", "demo-data", str(tmp_path / "w"), "--world", "geoclip", "--n-train", "300",
                                  "--n-val", "40", "--n-test", "40", "--n-heldout", "20"])
    assert r.exit_code == 0, r.output
    assert "300 train, 40 val, 40 test, 20 heldout records" in r.output
    assert len(open_store(str(tmp_path / "w" / "heldout.zarr"))) == 20
    r = CliRunner().invoke(cli, ["demo-data", str(tmp_path / "x"), "--n-val", "5"])
    assert r.exit_code == 2 and "--world geoclip" in r.output


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GeopipeError, match="pip install --no-deps 'geoclip"):
        le.geoclip_dir()


@pytest.mark.skipif(importlib.util.find_spec("geoclip") is None, reason="the geoclip package (real weights) is not installed")
def test_real_geoclip_encoder_loads_tensors_only_and_is_local():
    enc = le.load_geoclip_encoder()
    g = le.load_gallery()
    assert g.shape == (100000, 2) and enc.embed_dim == 512 and enc.name.startswith("geoclip-location@")
    paris = np.array([[48.8566, 2.3522], [48.8606, 2.3376], [40.7128, -74.0060]])  # two Paris points 1.2 km apart, New York
    e = le.encode_locations(enc, paris)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > 0.6 > e[0] @ e[2]

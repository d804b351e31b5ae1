"""The Python API: ``from geopipe import Geolocator`` — photos or embeddings in, distributions out."""

import math
import subprocess
import sys

import numpy as np
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.ingest.shards import iter_tar_samples
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM
from geopipe.pipeline.store.reader import open_store
from geopipe.stages.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def vmf_model(demo_stores, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("geolocator") / "vmf")
    run_train(TrainConfig(store=demo_stores["train"], out=out, method="vmf", dim=16, depth=1, steps=30, warmup=2, batch_size=64,
                          val_every=30, seed=0, resume=False, device="cpu", progress=False))
    return out


def test_import_geopipe_is_light_and_exposes_the_api():
    code = "import sys, geopipe; assert 'torch' not in sys.modules, 'torch'; assert 'Geolocator' in dir(geopipe); print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"


def test_photos_give_the_store_embeddings_and_the_same_predictions(vmf_model, demo_world, demo_stores):
    from geopipe import Geolocator

    samples = list(iter_tar_samples(demo_world["test"]))[:6]
    geo = Geolocator.load(vmf_model, device="cpu")
    assert geo.space["name"] == "tiny" and geo.space["embed_dim"] == 64
    emb = geo.embed([s["jpg"] for s in samples])
    store = open_store(demo_stores["test"])
    rows = [list(np.asarray(store.keys[:]).astype(str)).index(s["__key__"]) for s in samples]
    stored = np.asarray(store.embeddings[rows], dtype=np.float32)
    np.testing.assert_allclose(emb, stored, atol=2e-3)  # float16 store: the same backbone, weights and preprocessing

    res = geo.predict([s["jpg"] for s in samples], keys=[s["__key__"] for s in samples], samples=5, localizability=16)
    from_store = geo.predict(stored, keys=[s["__key__"] for s in samples], samples=5, localizability=16)
    assert len(res) == 6 and res.keys == [s["__key__"] for s in samples]
    assert np.isfinite(res.lat).all() and np.isfinite(res.lon).all() and (np.abs(res.lat) <= 90).all()
    np.testing.assert_allclose(res.lat, from_store.lat, atol=0.5)
    assert res.samples.shape == (6, 5, 2)
    assert (res.effective_area_km2 > 0).all() and (res.effective_area_km2 <= 4 * math.pi * EARTH_RADIUS_KM**2 * 1.01).all()


def test_log_prob_units_and_normalisation(vmf_model):
    from geopipe import Geolocator

    geo = Geolocator.load(vmf_model, device="cpu")
    emb = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    res = geo.predict(emb)
    sr, km2 = res.log_prob(10.0, 20.0), res.log_prob(10.0, 20.0, per="km2")
    np.testing.assert_allclose(sr - km2, 2 * math.log(EARTH_RADIUS_KM))
    # the density integrates to 1 over the sphere (Fibonacci quadrature, 20k points)
    n = 20000
    i = np.arange(n) + 0.5
    lat, lon = np.degrees(np.arcsin(1 - 2 * i / n)), (np.degrees(np.pi * (1 + 5**0.5) * i) + 180) % 360 - 180
    mass = np.mean([np.exp(res.log_prob(la, lo)) for la, lo in zip(lat[::20], lon[::20])], axis=0) * 4 * math.pi
    np.testing.assert_allclose(mass, 1.0, atol=0.05)


def test_bad_inputs_are_one_line_errors(vmf_model, tmp_path):
    from geopipe import Geolocator

    geo = Geolocator.load(vmf_model, device="cpu")
    with pytest.raises(GeopipeError, match="width 32 but model .* expects 64-d"):
        geo.predict(np.zeros((2, 32), np.float32))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(GeopipeError, match="image broken.jpg: .*skip it or fix the file"):
        geo.predict([str(bad)])


def test_to_geodataframe(vmf_model):
    pytest.importorskip("geopandas")
    from geopipe import Geolocator

    res = Geolocator.load(vmf_model, device="cpu").predict(np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32))
    gdf = res.to_geodataframe()
    assert len(gdf) == 4 and gdf.crs.to_epsg() == 4326
    np.testing.assert_allclose(gdf.geometry.y.to_numpy(), res.lat)


def test_regions_from_the_api_and_as_a_column(vmf_model):
    from geopipe import Geolocator

    geo = Geolocator.load(vmf_model, device="cpu")
    emb = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    res = geo.predict(emb, region=0.9)
    regions = res.region(0.9)
    assert len(regions) == 2 and res.region(0.9) is regions  # cached per q
    for r, area in zip(regions, res.columns["region_area_km2"]):
        assert abs(r.mass - 0.9) < 0.02 and r.area_km2 > 0 and r.geometry.is_valid
        np.testing.assert_allclose(r.area_km2, area, rtol=0.05)  # the column and the API agree
    gdf = res.to_geodataframe()
    assert gdf["region"].iloc[0].geom_type in ("Polygon", "MultiPolygon")

"""geopipe predict --region q: a GeoParquet polygon column per record that geopandas reads (pipeline/infer/regions.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_models import tiny_store, untrained_checkpoint

from geopipe.pipeline.core.errors import ConfigError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("region")
    return untrained_checkpoint(tmp / "ckpt"), tiny_store(tmp / "s.zarr")


def test_predict_region_is_a_geoparquet_polygon_column(setup, tmp_path):
    gpd = pytest.importorskip("geopandas")
    import shapely
    from pyproj import CRS

    from geopipe.pipeline.infer.regions import spherical_area_km2
    from geopipe.stages.predict import PredictConfig, run_predict

    ckpt, store = setup
    out = str(tmp_path / "p.parquet")
    run_predict(PredictConfig(ckpt, store, out, region=0.9, device="cpu", progress=False))
    geo = json.loads(pq.read_schema(out).metadata[b"geo"])
    assert geo["primary_column"] == "geometry"
    region = geo["columns"]["region"]  # no crs: OGC:CRS84
    assert {k: region[k] for k in ("encoding", "geometry_types")} == {"encoding": "WKB", "geometry_types": ["Polygon", "MultiPolygon"]}
    assert "crs" not in region and region["covering"]["bbox"]["xmin"] == ["region_bbox", "xmin"] and len(region["bbox"]) == 4
    gdf = gpd.read_parquet(out).set_geometry("region")
    assert gdf.crs is not None and gdf.crs.equals(CRS("OGC:CRS84"))
    assert len(gdf) == 5 and set(gdf.geom_type) <= {"Polygon", "MultiPolygon"} and gdf.is_valid.all()
    np.testing.assert_allclose(gdf["region_mass"], 0.9, atol=0.01)
    np.testing.assert_allclose(gdf["region_area_km2"], [spherical_area_km2(g) for g in gdf.region], rtol=1e-9)
    # the mode of a vMF (the point prediction) is its densest point: inside every HDR
    assert all(shapely.contains_xy(g, lon, lat) for g, lat, lon in zip(gdf.region, gdf["lat"], gdf["lon"]))
    assert json.loads(pq.read_schema(out).metadata[b"geopipe"])["config"]["region"] == 0.9


def test_dataset_parts_carry_the_region_bbox_and_no_region_means_null(setup, tmp_path):
    from geopipe.stages.predict import PredictConfig, run_predict

    ckpt, store = setup
    out = str(tmp_path / "ds")
    run_predict(PredictConfig(ckpt, store, out, region=0.5, device="cpu", progress=False))
    part = sorted(p for p in os.listdir(out) if p.startswith("part-"))[0]
    col = json.loads(pq.read_schema(os.path.join(out, part)).metadata[b"geo"])["columns"]["region"]
    lon0, lat0, lon1, lat1 = col["bbox"]
    assert -180 <= lon0 < lon1 <= 180 and -90 <= lat0 < lat1 <= 90
    plain = str(tmp_path / "plain.parquet")
    run_predict(PredictConfig(ckpt, store, plain, device="cpu", progress=False))
    table = pq.read_table(plain)
    assert table.column("region").null_count == 5 and table.column("region_mass").null_count == 5


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2.0])
def test_region_outside_zero_one_is_a_config_error(bad):
    from geopipe.stages.predict import PredictConfig

    with pytest.raises(ConfigError, match=r"--region must be a probability mass in \(0, 1\)"):
        PredictConfig("c", "s", "o.parquet", region=bad)


def test_cli_predict_region(setup, tmp_path):
    from click.testing import CliRunner

    from geopipe.flows.cli import cli

    ckpt, store = setup
    out = str(tmp_path / "p.parquet")
    ok = CliRunner().invoke(cli, ["predict", "-c", ckpt, "--store", store, "-o", out, "--region", "0.9", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert pq.read_table(out).column("region").null_count == 0
    bad = CliRunner().invoke(cli, ["predict", "-c", ckpt, "--store", store, "-o", out, "--region", "90", "--device", "cpu"])
    assert bad.exit_code != 0 and "--region must be a probability mass in (0, 1)" in bad.output
    r3 = untrained_checkpoint(tmp_path / "flow", "flow")
    refused = CliRunner().invoke(cli, ["predict", "-c", r3, "--store", store, "-o", out, "--region", "0.9", "--device", "cpu",
                                       "--overwrite"])
    assert refused.exit_code != 0 and "HDR regions need a density on the sphere" in refused.output

"""Predictions are GeoParquet that geopandas reads as WGS 84 lon/lat and reprojects."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, write_predictions


def _write(path, lat, lon):
    table = predictions_table({"key": [f"k{i}" for i in range(len(lat))], "lat": lat, "lon": lon}, len(lat))
    write_predictions(table, str(path), predictions_metadata({}, {}, {"version": "t"}))


def test_geo_metadata_follows_the_geoparquet_spec(tmp_path):
    _write(tmp_path / "p.parquet", np.array([10.0, -20.0, 45.5]), np.array([100.0, -170.0, 3.0]))
    geo = json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    col = geo["columns"]["geometry"]
    # no "crs" key means OGC:CRS84; an explicit null would mean "unknown CRS"
    assert "crs" not in col and col["encoding"] == "WKB" and col["geometry_types"] == ["Point"]
    assert col["bbox"] == [-170.0, -20.0, 100.0, 45.5]  # [min lon, min lat, max lon, max lat]


def test_geopandas_reads_wgs84_points_and_reprojects(tmp_path):
    gpd = pytest.importorskip("geopandas")
    from pyproj import CRS

    lat, lon = np.array([48.8566, -33.8688]), np.array([2.3522, 151.2093])
    _write(tmp_path / "p.parquet", lat, lon)
    gdf = gpd.read_parquet(tmp_path / "p.parquet")
    assert gdf.crs is not None and gdf.crs.equals(CRS("EPSG:4326"), ignore_axis_order=True)
    np.testing.assert_allclose(gdf.geometry.x, lon)
    np.testing.assert_allclose(gdf.geometry.y, lat)
    merc = gdf.to_crs(3857)  # spherical Mercator: x = R·λ, y = R·ln tan(π/4 + φ/2)
    r = 6378137.0
    np.testing.assert_allclose(merc.geometry.x, r * np.radians(lon), rtol=1e-9)
    np.testing.assert_allclose(merc.geometry.y, r * np.log(np.tan(math.pi / 4 + np.radians(lat) / 2)), rtol=1e-9)
    assert list(gdf["key"]) == ["k0", "k1"]


def test_bbox_skips_non_finite_points(tmp_path):
    _write(tmp_path / "p.parquet", np.array([np.nan, 5.0]), np.array([1.0, 6.0]))
    assert json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"geo"])["columns"]["geometry"]["bbox"] == [6.0, 5.0, 6.0, 5.0]
    _write(tmp_path / "q.parquet", np.array([np.nan]), np.array([np.nan]))
    assert "bbox" not in json.loads(pq.read_schema(tmp_path / "q.parquet").metadata[b"geo"])["columns"]["geometry"]

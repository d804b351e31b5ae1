"""Predictions are GeoParquet that geopandas reads as WGS 84 lon/lat and reprojects."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
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


# --- GeoParquet 1.1 as the spec writes it: bbox coverings, validated metadata, readers that filter ---

_BOX = ("xmin", "ymin", "xmax", "ymax")
#: The parts of the GeoParquet 1.1 "geo" metadata schema these files use (written from the
#: specification's text: version 1.1.x, required keys, WKB or native encodings, the geometry type
#: names, a 4- or 6-number bbox, and a covering whose bbox entry names a [column, field] path per
#: corner).
GEOPARQUET_1_1 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["version", "primary_column", "columns"],
    "properties": {
        "version": {"type": "string", "pattern": r"^1\.1\.\d+$"},
        "primary_column": {"type": "string", "minLength": 1},
        "columns": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": {
                "type": "object",
                "required": ["encoding", "geometry_types"],
                "properties": {
                    "encoding": {"enum": ["WKB", "point", "linestring", "polygon", "multipoint", "multilinestring", "multipolygon"]},
                    "geometry_types": {"type": "array", "uniqueItems": True,
                                       "items": {"type": "string", "pattern": "^(GeometryCollection|(Multi)?(Point|LineString|Polygon))( Z)?$"}},
                    "crs": {"type": ["object", "null"]},
                    "edges": {"enum": ["planar", "spherical"]},
                    "orientation": {"const": "counterclockwise"},
                    "epoch": {"type": "number"},
                    "bbox": {"type": "array", "items": {"type": "number"},
                             "oneOf": [{"minItems": 4, "maxItems": 4}, {"minItems": 6, "maxItems": 6}]},
                    "covering": {
                        "type": "object",
                        "minProperties": 1,
                        "properties": {"bbox": {
                            "type": "object",
                            "required": list(_BOX),
                            "properties": {k: {"type": "array", "minItems": 2, "maxItems": 2,
                                               "items": [{"type": "string", "minLength": 1}, {"const": k}]}
                                           for k in (*_BOX, "zmin", "zmax")},
                            "additionalProperties": False,
                        }},
                    },
                },
            },
        },
    },
}


def check_geoparquet(path) -> dict:
    """Validate a file's ``geo`` metadata against :data:`GEOPARQUET_1_1` and the rules the JSON
    schema cannot say (primary column listed, covering columns at the schema's root as structs of
    float/double xmin/ymin/xmax/ymax, bbox ordered and in lon/lat range); returns the ``geo`` value."""
    import jsonschema

    schema = pq.read_schema(path)
    geo = json.loads(schema.metadata[b"geo"])
    jsonschema.validate(geo, GEOPARQUET_1_1)
    assert geo["primary_column"] in geo["columns"]
    for name, col in geo["columns"].items():
        assert schema.field(name).type == pa.binary()
        column = {col["covering"]["bbox"][k][0] for k in _BOX}
        assert len(column) == 1
        struct = schema.field(column.pop()).type
        assert pa.types.is_struct(struct) and {struct.field(k).name for k in _BOX} == set(_BOX)
        assert all(pa.types.is_floating(struct.field(k).type) for k in _BOX)
        if "bbox" in col:
            x0, y0, x1, y1 = col["bbox"]
            assert -180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90
    return geo


def _with_regions(path, n=60, seed=0):
    """A predictions file of ``n`` points and a square region around every second one (degrees)."""
    import shapely

    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)
    region = [shapely.box(x - 2, y - 1, x + 3, y + 1).wkb if i % 2 == 0 else None for i, (x, y) in enumerate(zip(lon, lat))]
    table = predictions_table({"key": [f"k{i}" for i in range(n)], "lat": lat, "lon": lon, "region": region}, n)
    write_predictions(table, str(path), predictions_metadata({}, {}, {"version": "t"}))
    return lat, lon


def test_metadata_validates_against_geoparquet_1_1(tmp_path):
    """Before: no covering, and the schema's column names only (geopandas: bbox filter "not supported")."""
    lat, lon = _with_regions(tmp_path / "p.parquet")
    geo = check_geoparquet(tmp_path / "p.parquet")
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    assert geo["columns"]["region"]["covering"]["bbox"]["ymax"] == ["region_bbox", "ymax"]
    assert geo["columns"]["geometry"]["bbox"] == [lon.min(), lat.min(), lon.max(), lat.max()]
    even = np.arange(len(lat)) % 2 == 0
    assert geo["columns"]["region"]["bbox"] == [lon[even].min() - 2, lat[even].min() - 1, lon[even].max() + 3, lat[even].max() + 1]


def test_covering_columns_hold_each_geometry_extent(tmp_path):
    lat, lon = _with_regions(tmp_path / "p.parquet")
    t = pq.read_table(tmp_path / "p.parquet")
    boxes = t.column("bbox").to_pylist()
    assert boxes == [{"xmin": x, "ymin": y, "xmax": x, "ymax": y} for x, y in zip(lon, lat)]
    regions = t.column("region_bbox").to_pylist()
    assert regions[1] is None and regions[0] == {"xmin": lon[0] - 2, "ymin": lat[0] - 1, "xmax": lon[0] + 3, "ymax": lat[0] + 1}
    stats = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0)
    paths = {stats.column(i).path_in_schema: stats.column(i).statistics for i in range(stats.num_columns)}
    assert paths["bbox.xmin"].has_min_max and paths["bbox.xmin"].min == lon.min()  # what lets readers skip row groups


def test_geopandas_and_duckdb_filter_by_a_window(tmp_path):
    """Before: geopandas.read_parquet(p, bbox=…) raised "not supported for this Parquet file"."""
    gpd = pytest.importorskip("geopandas")
    duckdb = pytest.importorskip("duckdb")
    lat, lon = _with_regions(tmp_path / "p.parquet", n=200)
    window = (-30.0, -20.0, 60.0, 40.0)
    inside = {f"k{i}" for i in np.flatnonzero((lon >= -30) & (lon <= 60) & (lat >= -20) & (lat <= 40))}
    assert 10 < len(inside) < 150
    gdf = gpd.read_parquet(tmp_path / "p.parquet", bbox=window)
    assert set(gdf["key"]) == inside
    sql = (f"select key from read_parquet('{tmp_path / 'p.parquet'}') where bbox.xmin <= 60 and bbox.xmax >= -30 "
           "and bbox.ymin <= 40 and bbox.ymax >= -20")
    assert {r[0] for r in duckdb.sql(sql).fetchall()} == inside

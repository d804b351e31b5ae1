"""predict writes spec-complete GeoParquet 1.1: the file's bbox, a dataset's bbox as the union of
its parts in _metadata, covering columns that geopandas' bbox filter uses on files and datasets."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from geopipe.stages.predict import PredictConfig, run_predict
from tests.pipeline.artifacts.test_geoparquet import check_geoparquet
from tests.tiny_models import tiny_store, untrained_checkpoint

N = 64


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_geo")
    base = dict(checkpoint=untrained_checkpoint(root / "m"), store=tiny_store(root / "s.zarr", N), steps=2, device="cpu",
                progress=False)
    run_predict(PredictConfig(out=str(root / "p.parquet"), **base))
    run_predict(PredictConfig(out=str(root / "ds"), **base))
    return root


def _bbox(path) -> list[float]:
    return json.loads(pq.read_schema(path).metadata[b"geo"])["columns"]["geometry"]["bbox"]


def test_a_file_states_the_bbox_of_its_points(outputs):
    """Before: single-file predictions had no bbox (the docstring said they did)."""
    t = pq.read_table(outputs / "p.parquet", columns=["lat", "lon"])
    lat, lon = t.column("lat").to_numpy(), t.column("lon").to_numpy()
    geo = check_geoparquet(outputs / "p.parquet")
    assert geo["columns"]["geometry"]["bbox"] == [lon.min(), lat.min(), lon.max(), lat.max()]


def test_a_dataset_states_the_union_of_its_parts(outputs):
    """Before: _metadata had no bbox, so pyarrow reported part 0's bbox for the whole dataset."""
    ds = outputs / "ds"
    parts = sorted(p for p in os.listdir(ds) if p.startswith("part-"))
    boxes = np.array([_bbox(ds / p) for p in parts])
    union = [boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()]
    assert len(parts) >= 8 and _bbox(ds / parts[0]) != union
    for name in ("_metadata", "_common_metadata"):
        assert check_geoparquet(ds / name)["columns"]["geometry"]["bbox"] == union == _bbox(outputs / "p.parquet"), name


def test_geopandas_filters_files_and_datasets_by_a_window(outputs):
    gpd = pytest.importorskip("geopandas")
    t = pq.read_table(outputs / "p.parquet", columns=["key", "lat", "lon"])
    lat, lon = t.column("lat").to_numpy(), t.column("lon").to_numpy()
    window = (lon.min(), lat.min(), float(np.median(lon)), float(np.median(lat)))  # the south-west quarter, about
    inside = {k for k, a, o in zip(t.column("key").to_pylist(), lat, lon) if o <= window[2] and a <= window[3]}
    assert 0 < len(inside) < N
    for path in (outputs / "p.parquet", outputs / "ds"):
        assert set(gpd.read_parquet(path, bbox=window)["key"]) == inside, path

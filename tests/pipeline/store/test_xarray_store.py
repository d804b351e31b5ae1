"""The store is self-describing: xarray opens it, plain zarr lists it without warnings, arrays
are trimmed to attrs["rows"], and stores from before the rejects group still read and migrate."""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest

from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.verify import verify_store
from geopipe.pipeline.store.writer import StoreWriter

LATLON = np.array([[48.85, 2.35], [-33.87, 151.21], [40.71, -74.0], [35.68, 139.69]])


def _store(path) -> str:
    rng = np.random.default_rng(0)
    with StoreWriter.open(str(path), backbone={"name": "t"}, embed_dim=4, dtype="float32", created_by={}) as w:
        w.append_shard("a.tar", rng.normal(size=(2, 4)), LATLON[:2], ["k0", "k1"], {"country": ['"fr"', '"au"']},
                       [Reject("bad", "a.tar", "corrupt_image")], ShardStat(1, 0.0))
        w.append_shard("b.tar", rng.normal(size=(2, 4)), LATLON[2:], ["k2", "k3"], {}, [], ShardStat(1, 0.0))
    return str(path)


def test_xarray_opens_the_store_with_dimensions_coordinates_and_units(tmp_path):
    xr = pytest.importorskip("xarray")
    path = _store(tmp_path / "s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component of a Zarr hierarchy", no consolidated-metadata warning
        ds = xr.open_zarr(path)
        meta = xr.open_zarr(path, group="meta")
    assert dict(ds.sizes) == {"record": 4, "dim": 4, "coord": 2}
    assert ds["latlon"].dims == ("record", "coord") and ds["embeddings"].dims == ("record", "dim")
    assert list(ds["coord"].values) == ["lat", "lon"] and "keys" in ds.coords
    np.testing.assert_allclose(ds["latlon"].sel(coord="lat").values, LATLON[:, 0])
    np.testing.assert_allclose(ds["latlon"].sel(coord="lon").values, LATLON[:, 1])
    assert list(ds["keys"].values) == ["k0", "k1", "k2", "k3"] and list(ds["shard"].values) == [0, 0, 1, 1]
    np.testing.assert_allclose(np.linalg.norm(ds["embeddings"].values, axis=1), 1.0, rtol=1e-6)
    assert ds["latlon"].attrs["units"] == "degrees" and ds["latlon"].attrs["coord_units"] == ["degrees_north", "degrees_east"]
    assert ds.attrs["rows"] == 4 and ds.attrs["schema"] == "geopipe.store/1"
    assert list(meta["country"].values) == ["fr", "au", "", ""]  # string fields are stored as strings
    assert meta["country"].attrs["encoding"] == "string" and meta["country"].dims == ("record",)
    assert list(meta["keys"].values) == ["k0", "k1", "k2", "k3"] and "keys" in meta.coords  # the meta fields' coordinate


def test_string_meta_fields_are_stored_typed_and_read_back_as_json(tmp_path):
    rng = np.random.default_rng(0)
    path = str(tmp_path / "s.zarr")
    with StoreWriter.open(path, backbone={"name": "t"}, embed_dim=4, dtype="float32") as w:
        w.append_shard("a.tar", rng.normal(size=(3, 4)), LATLON[:3], ["a", "b", "c"],
                       {"city": ['"Zürich"', "", "null"], "year": ["2001", "2002", ""]}, [], ShardStat(1, 0.0))
        w.append_shard("b.tar", rng.normal(size=(1, 4)), LATLON[3:], ["d"], {"city": ["3"]}, [], ShardStat(1, 0.0))
    import zarr

    g = zarr.open_group(path, mode="r")
    assert g["meta/city"].attrs["encoding"] == "string" and g["meta/city"][:].tolist() == ["Zürich", "", "", "3"]
    assert g["meta/year"].attrs["encoding"] == "integer"  # numbers are stored as numbers (NaN: absent)
    np.testing.assert_array_equal(g["meta/year"][:], [2001.0, 2002.0, np.nan, np.nan])
    # geopipe's readers see JSON texts whatever the encoding (a number in a string field keeps its text)
    s = open_store(path)
    assert s.meta["city"][:].tolist() == ['"Zürich"', "", "", '"3"'] and s.meta["city"][0] == '"Zürich"'
    assert s.meta["year"][[1, 3]].tolist() == ["2002", ""] and verify_store(path) == []
    from geopipe.pipeline.eval.admin import store_admin_labels

    assert store_admin_labels(path, {"city": "city"}, ["a", "b", "c", "d"]) == {"city": ["Zürich", None, None, "3"]}


def test_arrays_are_trimmed_to_the_committed_rows(tmp_path):
    import zarr

    path = _store(tmp_path / "s.zarr")
    g = zarr.open_group(path, mode="r+")
    g["latlon"].resize((9, 2))  # what a run killed mid-shard leaves past attrs["rows"]
    g["meta/country"].resize((9,))
    StoreWriter.open(path, backbone={"name": "t"}, embed_dim=4, dtype="float32").close()
    assert g["latlon"].shape == (4, 2) and g["meta/country"].shape == (4,)
    with StoreWriter.open(path, backbone={"name": "t"}, embed_dim=4, dtype="float32") as w:
        assert w.truncate(1) == ["b.tar"]
    assert all(zarr.open_group(path)[n].shape[0] == 2 for n in ("embeddings", "latlon", "keys", "shard", "meta/country"))


def test_a_store_from_before_the_rejects_group_reads_verifies_and_migrates(tmp_path):
    path = str(tmp_path / "s.zarr")  # written by the code of 2026-12 (rejects group, no consolidated metadata) ...
    shutil.copytree(os.path.join(os.path.dirname(__file__), "fixtures", "store_2026_12.zarr"), path)
    os.remove(os.path.join(path, "rejects", "zarr.json"))  # ... moved to the layout before it: rejects.parquet at the root
    shutil.move(os.path.join(path, "rejects", "rejects.parquet"), os.path.join(path, "rejects.parquet"))
    assert open_store(path).rejects().num_rows == 2 and verify_store(path) == []
    StoreWriter.open(path, backbone={"name": "fixture", "pretrained": None, "embed_dim": 4}, embed_dim=4, dtype="float16").close()
    assert sorted(os.listdir(os.path.join(path, "rejects"))) == ["part-000000.parquet", "part-000002.parquet", "rejects.parquet",
                                                                 "zarr.json"]
    assert not os.path.exists(os.path.join(path, "rejects.parquet")) and verify_store(path) == []

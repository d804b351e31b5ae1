"""The store as other tools see it (issue 19 item 4): xarray and plain zarr open a fresh store without
a warning (consolidated metadata kept current by every commit, rejects in a folder zarr never lists),
numeric meta fields are float64 with the meta group's keys coordinate, every chunk carries a crc32c
that plain zarr checks; geopipe's readers return the JSON texts they always did; a store written by
the code before all this (tests/pipeline/store/fixtures/store_2026_12.zarr) opens, verifies and extends."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import numpy as np
import pytest

from geopipe.pipeline.retrieval.split import decode_meta
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.verify import check_store, verify_store
from geopipe.pipeline.store.writer import StoreWriter

xr = pytest.importorskip("xarray")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "store_2026_12.zarr")
FIXTURE_BACKBONE = {"name": "fixture", "pretrained": None, "embed_dim": 4}
META_A = {"country": ['"fr"', '"au"', '"it"', ""], "heading_deg": ["44.45", "90", "", "null"], "year": ["2001", "2002", "", "2004"]}
META_B = {"heading_deg": ['"north"', "271.5"], "year": ["3.5", "true"]}  # not numbers: kept as JSON text beside the numbers


def _store(path, chunk_rows: int = 3) -> str:
    rng = np.random.default_rng(0)
    with StoreWriter.open(str(path), backbone={"name": "t"}, embed_dim=4, dtype="float32", chunk_rows=chunk_rows) as w:
        w.append_shard("a.tar", rng.normal(size=(4, 4)), rng.uniform(-60, 60, (4, 2)), ["k0", "k1", "k2", "k3"], META_A,
                       [Reject("bad", "a.tar", "corrupt_image", "x")], ShardStat(1, 0.0))
        w.append_shard("b.tar", rng.normal(size=(2, 4)), rng.uniform(-60, 60, (2, 2)), ["k4", "k5"], META_B, [], ShardStat(1, 0.0))
    return str(path)


def _opened_warnings(path: str) -> list[str]:
    """Every warning of opening ``path`` the ways a user would: xarray (root, meta group, tree) and plain zarr."""
    import zarr

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xr.open_zarr(path).load()
        xr.open_zarr(path, group="meta").load()
        xr.open_datatree(path, engine="zarr")
        zarr.open_group(path, mode="r").tree()
        list(zarr.open_group(path, mode="r", use_consolidated=False).members(max_depth=None))
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def test_xarray_and_zarr_open_a_fresh_store_without_a_warning(tmp_path):
    path = _store(tmp_path / "s.zarr")
    assert _opened_warnings(path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds, meta = xr.open_zarr(path), xr.open_zarr(path, group="meta")
    assert meta["heading_deg"].dtype == np.float64 and meta["year"].dtype == np.float64 and "keys" in meta.coords
    np.testing.assert_array_equal(meta["heading_deg"].values, [44.45, 90.0, np.nan, np.nan, np.nan, 271.5])
    assert list(meta["keys"].values) == list(ds["keys"].values) == ["k0", "k1", "k2", "k3", "k4", "k5"]
    assert meta["heading_deg~json"].values.tolist() == ["", "", "", "", '"north"', ""]  # the value that is not a number
    assert meta["heading_deg"].attrs["encoding"] == "number" and "heading_deg~json" in meta["heading_deg"].attrs["long_name"]
    assert meta["country"].attrs["encoding"] == "string" and meta["year"].attrs["encoding"] == "integer"
    assert ds["rejects"].item() == "rejects.parquet" and "Parquet" in ds["rejects"].attrs["long_name"]
    assert sorted(os.listdir(os.path.join(path, "rejects"))) == ["part-000000.parquet", "rejects.parquet", "zarr.json"]


def test_the_consolidated_metadata_is_current_after_every_commit(tmp_path):
    import zarr

    path = str(tmp_path / "s.zarr")
    rng = np.random.default_rng(1)
    with StoreWriter.open(path, backbone={"name": "t"}, embed_dim=4, dtype="float32", chunk_rows=3) as w:
        for s in range(3):
            keys = [f"s{s}_{i}" for i in range(s + 2)]
            meta = {f"f{s}": ["1.5"] * len(keys)}  # a new field each shard: a new array the metadata must list
            w.append_shard(f"{s}.tar", rng.normal(size=(len(keys), 4)), rng.uniform(-9, 9, (len(keys), 2)), keys, meta, [],
                           ShardStat(1, 0.0))
            g = zarr.open_consolidated(path)  # what xarray reads: the root zarr.json alone
            rows = g.attrs["rows"]
            assert all(g[name].shape[0] == rows for name in ("embeddings", "latlon", "keys", "shard", "meta/keys", f"meta/f{s}"))
            assert xr.open_zarr(path, group="meta")[f"f{s}"].values[-1] == 1.5
        w.truncate(1)
    g = zarr.open_consolidated(path)
    assert g.attrs["rows"] == 2 and g["embeddings"].shape == (2, 4) and check_store(path).problems == ()


def test_readers_return_the_json_texts_they_did_and_callers_the_same_values(tmp_path):
    path = _store(tmp_path / "s.zarr")
    s = open_store(path)
    assert s.meta["country"][:].tolist() == ['"fr"', '"au"', '"it"', "", "", ""]
    assert s.meta["heading_deg"][:].tolist() == ["44.45", "90.0", "", "", '"north"', "271.5"]  # a number field: floats
    assert s.meta["year"][:].tolist() == ["2001", "2002", "", "2004", "3.5", "true"]  # an integer field: whole numbers as ints
    assert s.meta["year"][1] == "2002" and s.meta["heading_deg"][[4, 0]].tolist() == ['"north"', "44.45"]
    assert decode_meta(s.meta["year"][:]) == [2001, 2002, None, 2004, 3.5, True]
    assert decode_meta(s.meta["heading_deg"][:]) == [44.45, 90, None, None, "north", 271.5]
    assert read_store(path).meta["year"].tolist() == s.meta["year"][:].tolist()
    assert s.attrs["meta_text"] == ["heading_deg", "year"] and verify_store(path) == []
    from geopipe.pipeline.eval.admin import store_admin_labels

    assert store_admin_labels(path, {"city": "year"}, ["k1", "k5", "k2"]) == {"city": ["2002", "True", None]}


def test_a_flipped_byte_is_found_by_plain_zarr_xarray_and_verify(tmp_path):
    import zarr

    path = _store(tmp_path / "s.zarr")
    for name in ("embeddings", "latlon", "keys", "shard", "coord", "meta/keys", "meta/heading_deg", "meta/country", "rejects"):
        codecs = json.load(open(os.path.join(path, name, "zarr.json")))["codecs"]
        assert codecs[-1] == {"name": "crc32c"}, (name, codecs)
    chunk = os.path.join(path, "embeddings", "c", "1", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        zarr.open_group(path, mode="r")["embeddings"][:]
    with pytest.raises(ValueError, match="checksum"):
        _ = xr.open_zarr(path)["embeddings"].values
    problems = verify_store(path)
    assert any(p.startswith("embeddings, chunk c/1/0, rows [3, 6), shard 0, 1:") for p in problems), problems


def test_a_store_written_before_opens_verifies_and_extends(tmp_path):
    path = str(tmp_path / "old.zarr")
    shutil.copytree(FIXTURE, path)
    before = open_store(path)
    meta_before = {name: view[:].tolist() for name, view in before.meta.items()}
    assert meta_before["heading_deg"][:2] == ["178.87", "89.11"] and meta_before["year"][0] == "2000"  # JSON texts
    check = check_store(path)
    assert check.problems == () and any("no consolidated metadata" in n for n in check.notes)
    assert any("consolidated" in w for w in _opened_warnings(path))  # what xarray said of every store before
    rng = np.random.default_rng(3)
    with StoreWriter.open(path, backbone=FIXTURE_BACKBONE, embed_dim=4, dtype="float16") as w:
        w.append_shard("s3.tar", rng.normal(size=(2, 4)), [[1.0, 2.0], [3.0, 4.0]], ["n0", "n1"],
                       {"heading_deg": ["12.5", "13"], "pitch": ["1.25", "2"]}, [Reject("bad3", "s3.tar", "corrupt_image")],
                       ShardStat(1, 0.0))
    after = open_store(path)
    assert {name: view[:15].tolist() for name, view in after.meta.items() if name in meta_before} == meta_before
    assert after.meta["heading_deg"][15:].tolist() == ["12.5", "13"]  # an old field keeps its JSON text encoding
    assert after.meta["pitch"][:].tolist() == [""] * 15 + ["1.25", "2.0"]  # a new one is typed
    assert verify_store(path) == [] and after.rejects().num_rows == 3
    assert _opened_warnings(path) == []  # consolidated now; rejects node an array (no meta keys coordinate: not rewritten)
    assert json.load(open(os.path.join(path, "rejects", "zarr.json")))["node_type"] == "array"

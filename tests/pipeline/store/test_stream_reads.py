"""Reads of selected rows (retrieval's database and query blocks): a run of rows is read as a
slice, whole reads are not copied, and a non-finite float16 value (found by its bits) is still
a one-line StoreError naming its record."""

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.chunks import CHUNK_DIGESTS_ATTR
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.stream import _all_finite, read_rows, store_chunks
from geopipe.pipeline.store.writer import StoreWriter

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 6, "preprocess": {}, "fingerprint": "f16"}
N = 100


def _store(path) -> str:
    rng = np.random.default_rng(0)
    ll = np.column_stack([rng.uniform(-80, 80, N), rng.uniform(-170, 170, N)])
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=6, dtype="float16", chunk_rows=8) as w:
        w.append_shard("a.tar", rng.normal(size=(N, 6)), ll, [f"k{i:03d}" for i in range(N)], {}, [], ShardStat(1, 0.0))
    return str(path)


def test_runs_scattered_rows_and_chunks_read_what_indexing_reads(tmp_path):
    st = open_store(_store(tmp_path / "s.zarr"))
    every = np.asarray(st.embeddings[:])
    for rows in (np.arange(10, 37), np.array([3, 4, 9, 50]), np.array([7]), np.arange(0, N)):
        np.testing.assert_array_equal(read_rows(st, rows), every[rows])
    assert read_rows(st, np.array([], dtype=np.int64)).shape == (0, 6)
    for rows in (np.arange(N), np.arange(5, 90, 3)):
        got = list(store_chunks(st, rows, 16))
        np.testing.assert_array_equal(np.concatenate([i for i, _ in got]), rows)
        np.testing.assert_array_equal(np.concatenate([e for _, e in got]), every[rows])


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_nonfinite_float16_value_names_its_record(tmp_path, value):
    path = _store(tmp_path / "s.zarr")
    g = zarr.open_group(path, mode="r+")
    row = g["embeddings"][42]
    row[3] = value
    g["embeddings"][42] = row
    doc = json.loads((Path(path) / "zarr.json").read_text())
    del doc["attributes"][CHUNK_DIGESTS_ATTR]  # an outside edit: only the values can tell
    (Path(path) / "zarr.json").write_text(json.dumps(doc))
    st = open_store(path)
    for read in (lambda: read_rows(st, np.arange(40, 50)), lambda: read_rows(st, np.array([1, 42])),
                 lambda: list(store_chunks(st, np.arange(N), 16))):
        with pytest.raises(GeopipeError, match="k042") as err:
            read()
        assert "\n" not in str(err.value)
    np.testing.assert_array_equal(read_rows(st, np.arange(0, 40)), np.asarray(st.embeddings[0:40]))  # other rows read


def test_float16_bit_check_agrees_with_isfinite():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(9000, 5)).astype(np.float16)
    x[0] = np.float16(65504)  # the largest finite float16
    x[1] = -np.float16(65504)
    assert _all_finite(x) and _all_finite(x[:, 1:4]) and _all_finite(np.zeros((0, 5), np.float16))
    for value in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[8999, 4] = value
        assert not _all_finite(y) and not _all_finite(y[:, 2:]) and not _all_finite(y.astype(np.float32))

"""The reject limit: the shard that crosses it, mid-run or in the whole-store check at the end,
is not kept (a rerun redoes it); a store already over a lower limit says how to proceed; empty
shards are warned about."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import geopipe.pipeline.ingest.plan as plan
from geopipe.pipeline.ingest.plan import TooManyRejectsError
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.verify import verify_store
from geopipe.stages.import_embeddings import ImportConfig, run_import

D = 8


def _pair(root, i: int, n: int, bad: int):
    """Pair i: n rows of which the first ``bad`` have a latitude of 123 (rejected)."""
    os.makedirs(root / "img_emb", exist_ok=True)
    os.makedirs(root / "metadata", exist_ok=True)
    np.save(root / "img_emb" / f"img_emb_{i}.npy", np.random.default_rng(i).normal(size=(n, D)).astype(np.float32))
    lat = [123.0] * bad + [10.0] * (n - bad)
    pq.write_table(pa.table({"key": [f"p{i}_{j}" for j in range(n)], "latitude": lat, "longitude": [20.0] * n}),
                   root / "metadata" / f"metadata_{i}.parquet")


def _cfg(root, store, **kw):
    return ImportConfig(sources=(str(root),), store=str(store), backbone_name="x", progress=False, **kw)


def test_shard_crossing_the_limit_mid_run_is_not_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "_EARLY_FAIL_MIN_SAMPLES", 10)  # the mid-run check, on a small run
    for i, bad in enumerate((0, 1, 9, 0)):
        _pair(tmp_path / "emb", i, 10, bad)
    store = tmp_path / "s.zarr"
    with pytest.raises(TooManyRejectsError, match=r"img_emb_2\.npy was not kept \(shards before it were\)"):
        run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.3))
    s = open_store(str(store))
    assert s.rows == 19 and len(s.attrs["shards"]) == 2 and s.attrs["rejects"] == {"invalid_coordinates": 1}
    assert verify_store(str(store)) == []
    res = run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.95))  # the rerun redoes pair 2 and goes on
    assert (res.shards_done, res.shards_skipped) == (2, 2) and open_store(str(store)).rows == 30


def test_whole_store_limit_drops_the_shard_that_crossed_it(tmp_path):
    """Below the mid-run check's sample count the whole-store check decides, and it too keeps
    nothing over the limit (before: the shard was kept, and every rerun failed with nothing to do)."""
    for i, bad in enumerate((0, 1, 9, 0)):
        _pair(tmp_path / "emb", i, 10, bad)
    store = tmp_path / "s.zarr"
    for _ in range(2):  # the same limit: the rerun redoes pair 2 and refuses it again
        with pytest.raises(TooManyRejectsError, match=r"10 of 40 .*img_emb_2\.npy was not kept \(shards before it were\)"):
            run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.2))
        s = open_store(str(store))
        assert s.rows == 19 and len(s.attrs["shards"]) == 2 and s.attrs["rejects"] == {"invalid_coordinates": 1}
        assert verify_store(str(store)) == []
    res = run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.3))  # a higher limit: redone and kept
    assert (res.shards_done, res.shards_skipped) == (2, 2) and open_store(str(store)).rows == 30


def test_whole_store_limit_says_how_to_proceed(tmp_path):
    _pair(tmp_path / "emb", 0, 10, 6)
    store = tmp_path / "s.zarr"
    with pytest.raises(TooManyRejectsError, match=r"6 of 10 .*img_emb_0\.npy was not kept"):
        run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.5))
    assert open_store(str(store)).rows == 0
    assert run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.6)).shards_done == 1
    for _ in range(2):  # a store over a lower limit with every shard in: the message says what helps
        with pytest.raises(TooManyRejectsError, match=r"6 of 10 .*accept it with --max-reject-fraction 0\.60"):
            run_import(_cfg(tmp_path / "emb", store, max_reject_fraction=0.5))
    assert open_store(str(store)).rows == 4


def test_empty_shard_is_warned_about(tmp_path, capsys):
    _pair(tmp_path / "emb", 0, 4, 0)
    _pair(tmp_path / "emb", 1, 0, 0)
    res = run_import(_cfg(tmp_path / "emb", tmp_path / "s.zarr"))
    assert res.n_ok == 4 and res.shards_done == 2
    err = capsys.readouterr().err
    assert "geopipe: warning: " in err and "img_emb_1.npy holds no samples" in err

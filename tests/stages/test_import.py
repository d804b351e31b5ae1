"""Importing precomputed embeddings: pipeline/importers.py, stages/import_embeddings.py, `geopipe import`."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.ingest.pairs import PairError, discover_pairs, precomputed_identity
from geopipe.pipeline.ingest.plan import ShardChangedError
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.verify import verify_store
from geopipe.pipeline.store.writer import StoreMismatchError
from geopipe.stages.import_embeddings import ImportConfig, run_import

D = 8


def _table(keys, lats, lons, **extra):
    return pa.table({"key": keys, "latitude": lats, "longitude": lons, **extra})


def _write_pair(emb_path, meta_path, emb, table):
    os.makedirs(os.path.dirname(emb_path), exist_ok=True)
    os.makedirs(os.path.dirname(meta_path), exist_ok=True)
    np.save(emb_path, emb)
    pq.write_table(table, meta_path)


def _emb(n, seed):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _clip_folder(root, pairs):
    for i, (emb, table) in enumerate(pairs):
        _write_pair(str(root / "img_emb" / f"img_emb_{i}.npy"), str(root / "metadata" / f"metadata_{i}.parquet"), emb, table)
    return str(root)


def _cfg(sources, store, **kw):
    return ImportConfig(sources=tuple(sources), store=str(store), backbone_name="StreetCLIP", progress=False, **kw)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_clip_retrieval_folder_rows_rejects_and_resume(tmp_path):
    e0, e1 = _emb(5, 0), _emb(5, 1)
    e0[3] = np.nan  # invalid_embedding
    e1[1] = 0.0  # cannot be normalised: invalid_embedding
    t0 = _table(["a0", "a1", "a2", "a3", "a4"], [10.0, None, 123.0, 0.0, 5.0], [20.0, 0.0, 0.0, 0.0, 180.0],
                caption=["x", "y", "z", "w", None], year=[2001, 2002, 2003, 2004, 2005], tags=[[1]] * 5)
    t1 = _table(["b0", "b1", None, "a0", "b4"], [1.0, 2.0, 3.0, 4.0, 4.0], [float("nan"), 0.0, 0.0, 0.0, -7.5],
                caption=["p", "q", "r", "s", "t"], year=[1, 2, 3, 4, 5], tags=[[2]] * 5)
    folder = _clip_folder(tmp_path / "emb", [(e0, t0), (e1, t1)])
    store = tmp_path / "s.zarr"
    res = run_import(_cfg([folder], store, dtype="float32", max_reject_fraction=0.9))
    d = read_store(str(store))
    assert d.keys.tolist() == ["a0", "a4", "b4"]
    np.testing.assert_allclose(d.embeddings, _unit(np.stack([e0[0], e0[4], e1[4]])), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(d.latlon, [[10.0, 20.0], [5.0, -180.0], [4.0, -7.5]])  # 180 wraps to -180
    assert d.meta["caption"].tolist() == ['"x"', "", '"t"'] and d.meta["year"].tolist() == ["2001", "2005", "5"]
    assert "tags" not in d.meta  # lists are not carried by default
    rej = [(r["key"], r["reason"]) for r in open_store(str(store)).rejects().to_pylist()]
    assert rej == [("a1", "missing_coordinates"), ("a2", "invalid_coordinates"), ("a3", "invalid_embedding"),
                   ("b0", "invalid_coordinates"), ("b1", "invalid_embedding"), ("", "missing_key"), ("a0", "duplicate_key")]
    assert res.rejects_by_reason == {"invalid_embedding": 2, "missing_coordinates": 1, "invalid_coordinates": 2,
                                     "duplicate_key": 1, "missing_key": 1}
    attrs = open_store(str(store)).attrs
    assert attrs["backbone"] == precomputed_identity("StreetCLIP", D) and attrs["backbone"]["preprocess"] == {"source": "import"}
    assert list(attrs["shards"]) == [str(tmp_path / "emb" / "img_emb" / f"img_emb_{i}.npy") for i in (0, 1)]
    assert verify_store(str(store)) == []
    # resumable and incremental: a third pair appends only itself
    again = run_import(_cfg([folder], store, dtype="float32", max_reject_fraction=0.9))
    assert (again.shards_done, again.shards_skipped, again.n_ok) == (0, 2, 0)
    _write_pair(folder + "/img_emb/img_emb_2.npy", folder + "/metadata/metadata_2.parquet", _emb(2, 2),
                _table(["c0", "c1"], [0.0, 1.0], [0.0, 1.0]))
    more = run_import(_cfg([folder], store, dtype="float32", max_reject_fraction=0.9))
    assert (more.shards_done, more.shards_skipped, more.n_ok) == (1, 2, 2) and open_store(str(store)).rows == 5
    with pytest.raises(StoreMismatchError, match="StreetCLIP"):
        run_import(ImportConfig(sources=(folder,), store=str(store), backbone_name="OtherCLIP", dtype="float32", progress=False,
                                max_reject_fraction=0.9))


def test_plain_pairs_misaligned_pair_writes_nothing(tmp_path):
    src = tmp_path / "src"
    _write_pair(str(src / "a.npy"), str(src / "a.parquet"), _emb(3, 0), _table(["a0", "a1", "a2"], [0.0] * 3, [1.0] * 3))
    _write_pair(str(src / "b.npy"), str(src / "b.parquet"), _emb(4, 1), _table(["b0", "b1", "b2"], [0.0] * 3, [1.0] * 3))
    store = tmp_path / "s.zarr"
    with pytest.raises(PairError) as exc:
        run_import(_cfg([str(src / "*.npy")], store))
    msg = str(exc.value)
    assert msg == (f"pair misaligned: {src / 'b.npy'} has 4 embeddings but {src / 'b.parquet'} has 3 rows; "
                   f"row r of both files must describe the same image")
    s = open_store(str(store))
    assert s.rows == 3 and list(s.attrs["shards"]) == [str(src / "a.npy")]  # a committed, nothing of b
    assert verify_store(str(store)) == []
    runner = CliRunner()
    out = runner.invoke(cli, ["import", str(src / "*.npy"), "--store", str(store), "--backbone-name", "StreetCLIP"])
    assert out.exit_code == 1 and out.output.strip().splitlines()[-1] == f"geopipe: error: {msg}"
    _write_pair(str(src / "b.npy"), str(src / "b.parquet"), _emb(3, 1), _table(["b0", "b1", "b2"], [0.0] * 3, [1.0] * 3))
    out = runner.invoke(cli, ["import", str(src / "{a,b}.npy"), "--store", str(store), "--backbone-name", "StreetCLIP"])
    assert out.exit_code == 0 and ": 3 ok, 0 rejected; 1 pairs imported, 1 already done;" in out.output
    assert read_store(str(store)).keys.tolist() == ["a0", "a1", "a2", "b0", "b1", "b2"]


def test_pair_errors_are_one_line(tmp_path):
    src = tmp_path / "src"
    _write_pair(str(src / "a.npy"), str(src / "a.parquet"), _emb(2, 0), _table(["a0", "a1"], [0.0] * 2, [1.0] * 2))
    np.save(src / "lonely.npy", _emb(2, 1))
    with pytest.raises(PairError, match="lonely.npy has no metadata partner .*lonely.parquet"):
        discover_pairs([str(src / "*.npy")])
    (src / "img_emb").mkdir()
    with pytest.raises(PairError, match="not a clip-retrieval folder"):
        discover_pairs([str(src)])
    np.save(src / "img_emb" / "img_emb_0.npy", _emb(2, 1))
    (src / "metadata").mkdir()
    with pytest.raises(PairError, match="img_emb file 0 has no partner metadata/metadata_0.parquet"):
        discover_pairs([str(src)])
    store = str(tmp_path / "s.zarr")
    cases = [
        ((_emb(2, 2)[:, :5], _table(["w0", "w1"], [0.0] * 2, [0.0] * 2)), r"expected \(N, 8\) numeric embeddings"),
        ((_emb(2, 2), pa.table({"key": ["n0", "n1"], "lat": [0.0, 0.0], "longitude": [0.0, 0.0]})), r"columns \['latitude'\] not found"),
    ]
    run_import(_cfg([str(src / "a.npy")], store))
    for (emb, table), pattern in cases:
        _write_pair(str(src / "x.npy"), str(src / "x.parquet"), emb, table)
        with pytest.raises(PairError, match=pattern) as exc:
            run_import(_cfg([str(src / "a.npy"), str(src / "x.npy")], store))
        assert "\n" not in str(exc.value)
    assert open_store(store).rows == 2
    with pytest.raises(ValueError, match="backbone name"):
        ImportConfig(sources=("x",), store="s", backbone_name=" ")


def test_changed_pair_policies_and_memory_fs(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "/geopipe-import-test"
    try:
        for i in range(2):
            emb, table = _emb(3, i), _table([f"m{i}{j}" for j in range(3)], [float(i)] * 3, [float(j) for j in range(3)])
            fs.pipe_file(f"{root}/img_emb/img_emb_{i}.npy", _npy_bytes(emb))
            fs.pipe_file(f"{root}/metadata/metadata_{i}.parquet", _parquet_bytes(table))
        store = tmp_path / "s.zarr"
        res = run_import(_cfg([f"memory://{root}"], store))
        assert (res.shards_done, res.n_ok) == (2, 6) and verify_store(str(store)) == []
        new = _table(["m00", "m01", "m02"], [0.0] * 3, [0.0, 1.0, 2.0], caption=["now", "with", "captions"])
        fs.pipe_file(f"{root}/metadata/metadata_0.parquet", _parquet_bytes(new))  # size changes
        with pytest.raises(ShardChangedError, match="img_emb_0.npy changed since it was written"):
            run_import(_cfg([f"memory://{root}"], store))
        res = run_import(_cfg([f"memory://{root}"], store, on_changed="reextract"))
        assert (res.shards_done, res.shards_changed) == (2, (f"memory:///{root.strip('/')}/img_emb/img_emb_0.npy",))
        d = read_store(str(store))
        assert d.keys.tolist() == [f"m{i}{j}" for i in range(2) for j in range(3)] and d.meta["caption"][0] == '"now"'
        assert verify_store(str(store)) == []
    finally:
        fs.rm(root, recursive=True)


def _npy_bytes(arr):
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _parquet_bytes(table):
    import io

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()

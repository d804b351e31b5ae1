"""Extract stage end to end on generated WebDataset shards with the tiny backbone."""

import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demo_world import write_shards
from pipeline.errors import GeopipeError
from pipeline.lockfile import LockedError
from pipeline.store import open_store, read_store
from pipeline.store_writer import StoreMismatchError, StoreWriter, prepare_embeddings
from schemas.store import validate_store_attrs
from stages.extract import ExtractConfig, ShardChangedError, TooManyRejectsError, run_extract

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny():
    from pipeline.backbones import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec("tiny"))


def _jpeg(i: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(i)
    img = (rng.uniform(0, 1, (size, size, 3)) * 60 + rng.uniform(0, 190, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _good(key: str, i: int) -> dict:
    lat, lon = (i * 37.0) % 170 - 85, (i * 71.0) % 350 - 175
    return {"__key__": key, "jpg": _jpeg(i), "json": {"latitude": lat, "longitude": lon, "city": f"c{i}", "n": i, "tags": [1]}}


def _world(tmp_path, n_shards=4, per_shard=6, prefix="w"):
    samples = [_good(f"{prefix}{i:04d}", i) for i in range(n_shards * per_shard)]
    return write_shards(tmp_path / "shards", samples, prefix, per_shard)


def _cfg(shards, store, **kw):
    opts = dict(batch_size=4, num_workers=0, progress=False)
    return ExtractConfig(shards=tuple(shards), store=str(store), **{**opts, **kw})


def _same_store(a, b):
    da, db = read_store(str(a)), read_store(str(b))
    assert da.keys.tolist() == db.keys.tolist()
    assert np.array_equal(da.embeddings.view(np.uint16), db.embeddings.view(np.uint16))  # bit-identical
    assert np.array_equal(da.latlon, db.latlon) and np.array_equal(da.shard, db.shard)
    assert {k: v.tolist() for k, v in da.meta.items()} == {k: v.tolist() for k, v in db.meta.items()}
    for name in ("rows", "rejects", "meta_fields", "fingerprint", "backbone", "dtype", "normalized"):
        assert da.attrs[name] == db.attrs[name], name
    assert da.attrs["shards"] == db.attrs["shards"]  # same records: index, rows, counts, size, mtime, digest
    assert pq.read_table(a / "rejects.parquet").equals(pq.read_table(b / "rejects.parquet"))
    assert open_store(str(a)).rejects().equals(open_store(str(b)).rejects())


def test_extract_matches_schema_and_is_independent_of_workers(tmp_path, tiny):
    shards = _world(tmp_path, n_shards=3, per_shard=5)
    pattern = str(tmp_path / "shards" / "w-{000000..000002}.tar")
    r0 = run_extract(_cfg([pattern], tmp_path / "a.zarr"), backbone=tiny)
    r2 = run_extract(ExtractConfig(shards=(pattern,), store=str(tmp_path / "b.zarr"), batch_size=4, num_workers=2,
                                   progress=True), backbone=tiny)
    assert (r0.n_ok, r0.n_rejected, r0.shards_done, r0.shards_skipped) == (15, 0, 3, 0)
    assert r2.n_ok == 15 and r2.images_per_s > 0 and "15 ok" in r2.summary()
    _same_store(tmp_path / "a.zarr", tmp_path / "b.zarr")
    s = open_store(str(tmp_path / "a.zarr"))
    assert s.validate() == [] and validate_store_attrs(s.attrs) == []
    assert s.attrs["backbone"] == tiny.identity and s.attrs["dtype"] == "float16" and s.attrs["normalized"] is True
    assert s.attrs["created_by"]["config"]["backbone"] == "tiny" and "git_rev" in s.attrs["created_by"]
    assert [s.attrs["shards"][u]["start"] for u in shards] == [0, 5, 10]
    d = read_store(str(tmp_path / "a.zarr"))
    assert d.keys.tolist() == [f"w{i:04d}" for i in range(15)]
    assert d.meta["city"][3] == '"c3"' and d.meta["n"][3] == "3" and "tags" not in d.meta  # scalars only
    np.testing.assert_allclose(d.latlon[7], [(7 * 37.0) % 170 - 85, (7 * 71.0) % 350 - 175])
    # each row is its own image's embedding (independent oracle: encode one image at a time)
    for i in (0, 6, 14):
        img = Image.open(io.BytesIO(_jpeg(i))).convert("RGB")
        want, _ = prepare_embeddings(tiny.encode(tiny.preprocess(img)[None]).numpy(), "float16", True)
        np.testing.assert_allclose(d.embeddings[i].astype(np.float32), want[0].astype(np.float32), atol=2e-3)
    assert np.abs(np.linalg.norm(d.embeddings.astype(np.float32), axis=1) - 1).max() < 2e-3


def _bad_shard(tmp_path):
    jpg = _jpeg(100)
    samples = [
        _good("g0", 0),
        {"__key__": "trunc", "jpg": jpg[: len(jpg) // 2], "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "nojson", "jpg": _jpeg(1)},
        _good("g1", 1),
        {"__key__": "lat123", "jpg": _jpeg(2), "json": {"latitude": 123.0, "longitude": 2.0}},
        {"__key__": "zero", "jpg": b"", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "listjson", "jpg": _jpeg(3), "json": [1, 2]},
        {"__key__": "notimg", "jpg": b"this is not a jpeg", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "noimg", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "nanlon", "jpg": _jpeg(4), "json": {"latitude": 1.0, "longitude": float("nan")}},
        {"__key__": "strlat", "jpg": _jpeg(5), "json": {"latitude": "north", "longitude": 2.0}},
        {"__key__": "nolat", "jpg": _jpeg(6), "json": {"longitude": 2.0}},
        {"__key__": "badjson", "jpg": _jpeg(7), "json": b"{not json"},
        _good("g2", 2),
        {**_good("g1", 9)},  # duplicate key: the first g1 is kept
        _good("g3", 3),
    ]
    return write_shards(tmp_path / "bad", samples, "bad", 100)[0]


EXPECTED_REJECTS = [
    ("trunc", "corrupt_image"), ("nojson", "missing_json"), ("lat123", "invalid_coordinates"),
    ("zero", "corrupt_image"), ("listjson", "invalid_json"), ("notimg", "corrupt_image"), ("noimg", "missing_image"),
    ("nanlon", "invalid_coordinates"), ("strlat", "invalid_coordinates"), ("nolat", "missing_coordinates"),
    ("badjson", "invalid_json"), ("g1", "duplicate_key"),
]


def test_bad_samples_are_skipped_counted_and_written(tmp_path, tiny):
    good = _world(tmp_path, n_shards=1, per_shard=3, prefix="ok")
    bad = _bad_shard(tmp_path)
    res = run_extract(_cfg([bad, *good], tmp_path / "s.zarr", max_reject_fraction=0.9), backbone=tiny)
    rej = pq.read_table(tmp_path / "s.zarr" / "rejects.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rej] == EXPECTED_REJECTS  # tar order
    assert {r["shard"] for r in rej} == {bad} and all(r["detail"] for r in rej)
    assert read_store(str(tmp_path / "s.zarr")).keys.tolist() == ["g0", "g1", "g2", "g3", "ok0000", "ok0001", "ok0002"]
    want = {}
    for _, reason in EXPECTED_REJECTS:
        want[reason] = want.get(reason, 0) + 1
    assert res.rejects_by_reason == want and res.n_rejected == 12 and res.n_ok == 7
    assert open_store(str(tmp_path / "s.zarr")).attrs["rejects"] == want
    with pytest.raises(TooManyRejectsError, match="too many rejects: 12 of 16"):
        run_extract(_cfg([bad], tmp_path / "t.zarr", max_reject_fraction=0.5), backbone=tiny)
    assert open_store(str(tmp_path / "t.zarr")).rows == 4  # what was committed stays valid
    with pytest.raises(TooManyRejectsError, match="12 of 16"):  # a retry (all shards done) cannot hide them
        run_extract(_cfg([bad], tmp_path / "t.zarr", max_reject_fraction=0.5), backbone=tiny)


def test_truncated_tar_keeps_rows_before_the_break(tmp_path, tiny):
    shards = _world(tmp_path, n_shards=2, per_shard=6)
    members = {m.name: m for m in tarfile.open(shards[0]).getmembers()}
    raw = open(shards[0], "rb").read()
    cut = members["w0004.jpg"].offset_data + 100  # inside sample 4's image
    with open(shards[0], "wb") as fh:
        fh.write(raw[:cut])
    res = run_extract(_cfg(shards, tmp_path / "s.zarr"), backbone=tiny)
    keys = read_store(str(tmp_path / "s.zarr")).keys.tolist()
    assert keys == [f"w{i:04d}" for i in (0, 1, 2, 3, *range(6, 12))]
    rej = pq.read_table(tmp_path / "s.zarr" / "rejects.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rej] == [("w0003", "corrupt_shard")] and "w0004" in rej[0]["detail"]
    assert res.rejects_by_reason == {"corrupt_shard": 1}


def test_missing_shard_is_a_user_error(tmp_path):
    _world(tmp_path, n_shards=2, per_shard=1)
    pattern = str(tmp_path / "shards" / "w-{000000..000002}.tar")
    with pytest.raises(GeopipeError) as exc:
        run_extract(_cfg([pattern], tmp_path / "s.zarr"))
    assert str(exc.value) == f"shard not found: {tmp_path / 'shards' / 'w-000002.tar'} (check the path or brace pattern)"
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(GeopipeError, match="unknown backbone 'nope'"):
        run_extract(_cfg([str(tmp_path / "shards" / "w-000000.tar")], tmp_path / "s.zarr", backbone="nope"))
    assert not (tmp_path / "s.zarr").exists()


def _world_with_rejects(tmp_path):
    samples = [_good(f"r{i:03d}", i) for i in range(16)]
    samples[2] = {"__key__": "r002", "jpg": b"", "json": {"latitude": 0.0, "longitude": 0.0}}
    samples[9] = _good("r001", 9)  # duplicate across shards
    samples[13] = {"__key__": "r013", "jpg": _jpeg(13)}
    return write_shards(tmp_path / "shards", samples, "r", 4)


def test_resume_after_partial_run_and_crash_is_identical(tmp_path, tiny, monkeypatch):
    shards = _world_with_rejects(tmp_path)
    run_extract(_cfg(shards, tmp_path / "ref.zarr"), backbone=tiny)
    # (1) a run on 2 of 4 shards, then all 4
    run_extract(_cfg(shards[:2], tmp_path / "part.zarr"), backbone=tiny)
    res = run_extract(_cfg(shards, tmp_path / "part.zarr"), backbone=tiny)
    assert (res.shards_done, res.shards_skipped) == (2, 2)
    _same_store(tmp_path / "ref.zarr", tmp_path / "part.zarr")
    # (2) a crash after shard 2's arrays and rejects part are written, before its completion record
    calls = {"n": 0}
    real = StoreWriter._commit

    def crash(self, update):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        real(self, update)

    monkeypatch.setattr(StoreWriter, "_commit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_extract(_cfg(shards, tmp_path / "crash.zarr"), backbone=tiny)
    s = open_store(str(tmp_path / "crash.zarr"))
    assert s.rows == 7 and s._group["keys"].shape[0] > 7  # uncommitted rows past attrs["rows"]
    monkeypatch.setattr(StoreWriter, "_commit", real)
    res = run_extract(_cfg(shards, tmp_path / "crash.zarr", num_workers=2), backbone=tiny)
    assert (res.shards_done, res.shards_skipped) == (2, 2)
    _same_store(tmp_path / "ref.zarr", tmp_path / "crash.zarr")


def test_kill_9_mid_shard_then_resume_is_identical(tmp_path, tiny):
    shards = _world_with_rejects(tmp_path)
    run_extract(_cfg(shards, tmp_path / "ref.zarr"), backbone=tiny)
    script = textwrap.dedent(f"""
        import os, signal
        from pipeline.store_writer import StoreWriter
        from stages.extract import ExtractConfig, run_extract
        real, n = StoreWriter._commit, [0]
        def commit(self, update):
            n[0] += 1
            if n[0] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            real(self, update)
        StoreWriter._commit = commit
        run_extract(ExtractConfig(shards={tuple(shards)!r}, store={str(tmp_path / 'k.zarr')!r}, batch_size=4,
                                  num_workers=2, progress=False))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "k.zarr" / ".lock").exists() and open_store(str(tmp_path / "k.zarr")).rows == 3
    res = run_extract(_cfg(shards, tmp_path / "k.zarr"), backbone=tiny)  # takes over the stale lock
    assert (res.shards_done, res.shards_skipped) == (3, 1)
    _same_store(tmp_path / "ref.zarr", tmp_path / "k.zarr")
    assert not (tmp_path / "k.zarr" / ".lock").exists()


def test_mismatch_lock_and_changed_shard_are_refused(tmp_path, tiny, monkeypatch):
    import socket

    shards = _world(tmp_path, n_shards=2, per_shard=3)
    store = tmp_path / "s.zarr"
    run_extract(_cfg(shards[:1], store), backbone=tiny)
    other = dataclasses.replace(tiny, identity={**tiny.identity, "fingerprint": "0" * 64})
    with pytest.raises(StoreMismatchError, match="refusing to append"):
        run_extract(_cfg(shards, store), backbone=other)
    with pytest.raises(StoreMismatchError, match="float32"):
        run_extract(_cfg(shards, store, dtype="float32"), backbone=tiny)
    # a live lock fails at once, before any backbone is loaded
    monkeypatch.setattr("stages.extract._load_backbone", lambda *a: pytest.fail("loaded a backbone"))
    (store / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    with pytest.raises(LockedError, match="locked by process"):
        run_extract(_cfg(shards, store))
    (store / ".lock").unlink()
    # a shard rewritten since extraction
    write_shards(tmp_path / "shards", [_good("w0000", 0), _good("zz", 50)], "w", 3)
    with pytest.raises(ShardChangedError, match="changed since it was extracted"):
        run_extract(_cfg(shards, store), backbone=tiny)
    res = run_extract(_cfg(shards, store, allow_changed=True), backbone=tiny)
    assert res.shards_changed == (shards[0],) and res.shards_done == 1 and open_store(str(store)).rows == 6


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        ExtractConfig(shards=("a",), store="s", batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        ExtractConfig(shards=("a",), store="s", dtype="bfloat16")
    with pytest.raises(ValueError, match="meta field"):
        ExtractConfig(shards=("a",), store="s", meta_fields=("latitude",))
    assert ExtractConfig(shards="a.tar", store="s").shards == ("a.tar",)
    assert json.dumps(dataclasses.asdict(ExtractConfig(shards=["a"], store="s")))  # recorded in attrs

"""Store I/O, shard reading and rejects: pipeline/store.py, store_writer.py, shards.py, rejects.py, lockfile.py."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.lockfile import DirLock, LockedError
from geopipe.pipeline.ingest.shards import CorruptShardError, ShardNotFoundError, iter_tar_samples, resolve_shards
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import EmbeddingStore, StoreError, open_store, read_store
from geopipe.pipeline.store.rejects import Reject, count_reasons, read_rejects, write_rejects
from geopipe.pipeline.store.writer import StoreMismatchError, StoreWriter, prepare_embeddings
from geopipe.schemas.rejects import REJECTS_SCHEMA
from geopipe.schemas.store import REQUIRED_ATTRS, validate_store_attrs

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 4, "preprocess": {"size": 8}, "fingerprint": "abc"}
STAT = ShardStat(100, 1.5)


def _writer(path, **kw):
    opts = dict(backbone=IDENTITY, embed_dim=4, dtype="float16", normalize=True, created_by={"version": "t"})
    opts.update(kw)
    return StoreWriter.open(str(path), **opts)


def _rows(n, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)) * 3, np.column_stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)])


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


# --------------------------------------------------------------------------- writer and reader


def test_writer_roundtrip_normalises_wraps_and_records(tmp_path):
    store = tmp_path / "s.zarr"
    emb1, ll1 = _rows(5, 0)
    emb2, ll2 = _rows(3, 1)
    ll2[0] = (10.0, 180.0)  # wraps to -180
    with _writer(store) as w:
        r1 = w.append_shard("a.tar", emb1, ll1, [f"a{i}" for i in range(5)], {"city": ['"x"'] * 5}, [], STAT)
        rej = [Reject("b9", "b.tar", "corrupt_image", "bad")]
        r2 = w.append_shard("b.tar", emb2, ll2, ["b0", "b1", "b2"], {"year": ["1", "2", "3"]}, rej, STAT)
    assert (r1["start"], r1["stop"], r2["start"], r2["stop"], r2["index"]) == (0, 5, 5, 8, 1)
    s = open_store(str(store))
    assert s.validate() == [] and validate_store_attrs(s.attrs) == []
    assert set(REQUIRED_ATTRS) <= set(s.attrs) and s.attrs["rows"] == 8 and s.attrs["rejects"] == {"corrupt_image": 1}
    d = read_store(str(store))
    assert d.embeddings.dtype == np.float16 and d.embeddings.shape == (8, 4)
    want = np.concatenate([emb1, emb2]) / np.linalg.norm(np.concatenate([emb1, emb2]), axis=1, keepdims=True)
    np.testing.assert_allclose(d.embeddings.astype(np.float64), want, atol=1e-3)
    assert d.keys.tolist() == ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    assert d.shard.tolist() == [0] * 5 + [1] * 3
    np.testing.assert_array_equal(d.latlon[5], [10.0, -180.0])
    np.testing.assert_array_equal(d.latlon[:5], ll1)
    assert d.meta["city"].tolist() == ['"x"'] * 5 + [""] * 3  # fields appearing later: "" before
    assert d.meta["year"].tolist() == [""] * 5 + ["1", "2", "3"]
    t = pq.read_table(store / "rejects" / "rejects.parquet")
    assert t.schema.equals(REJECTS_SCHEMA, check_metadata=False) and t.column("key").to_pylist() == ["b9"]
    assert s.rejects().to_pylist() == t.to_pylist()
    assert not (store / ".lock").exists()


def test_float32_unnormalised_store_keeps_values(tmp_path):
    emb, ll = _rows(4, 2)
    with _writer(tmp_path / "s.zarr", dtype="float32", normalize=False) as w:
        w.append_shard("a.tar", emb, ll, list("wxyz"), {}, [], STAT)
    d = read_store(str(tmp_path / "s.zarr"))
    assert d.embeddings.dtype == np.float32 and d.attrs["normalized"] is False
    np.testing.assert_array_equal(d.embeddings, emb.astype(np.float32))


def test_writer_rejects_bad_input(tmp_path):
    emb, ll = _rows(2, 3)
    with _writer(tmp_path / "s.zarr") as w:
        w.append_shard("a.tar", emb, ll, ["k0", "k1"], {}, [], STAT)
        with pytest.raises(ValueError, match="keys must be new"):
            w.append_shard("b.tar", emb, ll, ["k1", "k2"], {}, [], STAT)
        with pytest.raises(ValueError, match="already in store"):
            w.append_shard("a.tar", emb, ll, ["k5", "k6"], {}, [], STAT)
        with pytest.raises(ValueError, match="non-finite"):
            w.append_shard("c.tar", np.full((2, 4), np.nan), ll, ["k7", "k8"], {}, [], STAT)
        with pytest.raises(ValueError, match=r"expected \(2, 4\) embeddings"):
            w.append_shard("c.tar", emb[:, :3], ll, ["k7", "k8"], {}, [], STAT)
        with pytest.raises(ValueError, match="meta field"):
            w.append_shard("c.tar", emb, ll, ["k7", "k8"], {"a/b": ["1", "2"]}, [], STAT)
        rec = w.append_shard("empty.tar", [], [], [], {}, [Reject("e", "empty.tar", "missing_json")], STAT)
    assert (rec["start"], rec["stop"], rec["n_rejected"]) == (2, 2, 1)
    s = open_store(str(tmp_path / "s.zarr"))
    assert s.rows == 2 and s.validate() == [] and s.rejects().num_rows == 1


def test_prepare_embeddings_flags_unusable_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [np.inf, 1.0], [1e6, 0.0]])
    y, ok = prepare_embeddings(x, "float16", True)
    assert ok.tolist() == [True, False, False, True]
    np.testing.assert_allclose(y[0].astype(float), [0.6, 0.8], atol=1e-3)
    _, ok = prepare_embeddings(x, "float16", False)
    assert ok.tolist() == [True, True, False, False]  # 1e6 overflows float16
    _, ok = prepare_embeddings(x, "float32", False)
    assert ok.tolist() == [True, True, False, True]


def test_reader_clips_uncommitted_rows(tmp_path):
    import zarr

    store = tmp_path / "s.zarr"
    emb, ll = _rows(3, 4)
    with _writer(store) as w:
        w.append_shard("a.tar", emb, ll, ["k0", "k1", "k2"], {}, [], STAT)
    g = zarr.open_group(str(store), mode="r+")
    for name in ("embeddings", "latlon", "keys", "shard"):  # what a crash mid-shard leaves behind
        g[name].resize((7, *g[name].shape[1:]))
    s = open_store(str(store))
    assert len(s) == len(s.keys) == 3 and s.embeddings.shape == (3, 4)
    assert s.keys[:].tolist() == ["k0", "k1", "k2"] and s.keys[1:100].tolist() == ["k1", "k2"]
    assert s.keys[-1] == "k2" and s.keys[np.array([2, 0])].tolist() == ["k2", "k0"]
    assert np.asarray(s.latlon).shape == (3, 2)
    with pytest.raises(IndexError):
        s.keys[3]
    with _writer(store) as w:  # the next writer overwrites the leftovers
        w.append_shard("b.tar", emb[:1], ll[:1], ["k3"], {}, [], STAT)
    assert read_store(str(store)).keys.tolist() == ["k0", "k1", "k2", "k3"]
    assert zarr.open_group(str(store), mode="r")["keys"].shape == (4,)


def test_not_a_store_errors(tmp_path):
    with pytest.raises(StoreError, match="not a geopipe embedding store"):
        EmbeddingStore(str(tmp_path / "nope"))
    import zarr

    zarr.create_group(store=str(tmp_path / "plain"))
    with pytest.raises(StoreError, match="schema"):
        open_store(str(tmp_path / "plain"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hi")
    with pytest.raises(StoreError, match="not empty"):
        _writer(tmp_path / "junk")
    assert not (tmp_path / "junk" / ".lock").exists()
    assert issubclass(StoreError, GeopipeError)


def test_incompatible_append_refused(tmp_path):
    emb, ll = _rows(2, 5)
    with _writer(tmp_path / "s.zarr") as w:
        w.append_shard("a.tar", emb, ll, ["k0", "k1"], {}, [], STAT)
    with pytest.raises(StoreMismatchError, match="refusing to append.*fingerprint"):
        _writer(tmp_path / "s.zarr", backbone={**IDENTITY, "fingerprint": "other"})
    with pytest.raises(StoreMismatchError, match="float32"):
        _writer(tmp_path / "s.zarr", dtype="float32")
    assert not (tmp_path / "s.zarr" / ".lock").exists()


def test_interrupted_creation_is_recreated(tmp_path):
    import zarr

    store = tmp_path / "s.zarr"
    zarr.create_array(store=str(store / "keys"), shape=(3,), dtype=str)  # leftovers, no root zarr.json
    with _writer(store) as w:
        assert w.rows == 0
    assert open_store(str(store)).validate() == []


def test_uncommitted_meta_and_rejects_parts_are_dropped(tmp_path):
    store = tmp_path / "s.zarr"
    emb, ll = _rows(2, 6)
    with _writer(store) as w:
        w.append_shard("a.tar", emb, ll, ["k0", "k1"], {}, [], STAT)
        w._commit = lambda update: (_ for _ in ()).throw(RuntimeError("crash"))  # dies before the commit
        with pytest.raises(RuntimeError):
            w.append_shard("b.tar", emb, ll, ["k2", "k3"], {"new": ["1", "2"]}, [Reject("x", "b.tar", "missing_json")], STAT)
    assert (store / "rejects" / "part-000001.parquet").exists() and (store / "meta" / "new").exists()
    with _writer(store) as w:
        assert w.rows == 2 and w.keys_seen == {"k0", "k1"}
    assert not (store / "rejects" / "part-000001.parquet").exists() and not (store / "meta" / "new").exists()
    s = open_store(str(store))
    assert s.rejects().num_rows == 0 and read_rejects(str(store / "rejects" / "rejects.parquet")).num_rows == 0


# --------------------------------------------------------------------------- lock


def test_lock_held_by_live_process_fails_fast(tmp_path):
    with DirLock(str(tmp_path)):
        with pytest.raises(LockedError, match=f"locked by process {os.getpid()} on .*; wait for it to finish"):
            DirLock(str(tmp_path)).acquire()
    assert not (tmp_path / ".lock").exists()


def test_a_killed_holders_lock_is_free_at_once(tmp_path):
    """flock: the kernel drops the lock of a dead process; its pid left in the file does not matter."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from geopipe.pipeline.core.lockfile import DirLock; "
                               f"DirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"locked by process {holder.pid}"):
        DirLock(str(tmp_path)).acquire()
    holder.kill()
    holder.wait()
    assert (tmp_path / ".lock").read_text().split()[0] == str(holder.pid)  # what kill -9 leaves
    with DirLock(str(tmp_path)) as lock:
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid()) and lock.held
    assert not (tmp_path / ".lock").exists()


# --------------------------------------------------------------------------- shards and rejects


def test_resolve_shards_braces_globs_and_missing(tmp_path):
    for i in range(3):
        (tmp_path / f"d-{i:06d}.tar").write_bytes(b"x")
    got = resolve_shards([str(tmp_path / "d-{000001..000002}.tar"), str(tmp_path / "d-*.tar")])
    assert [os.path.basename(p) for p in got] == ["d-000001.tar", "d-000002.tar", "d-000000.tar"]
    assert all(os.path.isabs(p) for p in got)
    missing = str(tmp_path / "d-000003.tar")
    with pytest.raises(ShardNotFoundError) as exc:
        resolve_shards([str(tmp_path / "d-{000002..000003}.tar")])
    assert str(exc.value) == f"shard not found: {missing} (check the path or brace pattern)"
    with pytest.raises(ShardNotFoundError):
        resolve_shards([str(tmp_path / "nothing-*.tar")])


def test_iter_tar_samples_groups_by_key_and_detects_truncation(tmp_path):
    members = [("a.jpg", b"1"), ("a.json", b"{}"), ("__meta__.txt", b"m"), ("b.JPG", b"2"), ("b.json", b"{}"),
               ("a.jpg", b"3" * 2000), ("c.seg.png", b"4")]
    path = _tar(tmp_path / "t.tar", members)
    samples = list(iter_tar_samples(path))
    assert [s["__key__"] for s in samples] == ["a", "b", "a", "c"]
    assert samples[1]["jpg"] == b"2" and samples[3]["seg.png"] == b"4"
    raw = open(path, "rb").read()
    offsets = {m.name: m.offset for m in tarfile.open(path).getmembers()}
    for cut in (offsets["b.json"], offsets["b.json"] + 100, offsets["b.json"] + 600):  # header boundary, mid-header, mid-data
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        got = []
        with pytest.raises(CorruptShardError) as exc:
            for s in iter_tar_samples(str(tmp_path / "cut.tar")):
                got.append(s["__key__"])
        assert got == ["a"] and exc.value.last_key == "a" and "'b' dropped" in exc.value.detail
    (tmp_path / "cut.tar").write_bytes(raw[: offsets["c.seg.png"] - 1000])  # inside the next sample's member:
    got = []  # b is complete and kept
    with pytest.raises(CorruptShardError) as exc:
        for s in iter_tar_samples(str(tmp_path / "cut.tar")):
            got.append(s["__key__"])
    assert got == ["a", "b"] and exc.value.last_key == "b" and "sample 'a' dropped" in exc.value.detail
    (tmp_path / "garbage.tar").write_bytes(b"\x01" * 700)
    with pytest.raises(CorruptShardError) as exc:
        list(iter_tar_samples(str(tmp_path / "garbage.tar")))
    assert exc.value.last_key == ""


def test_rejects_io_roundtrip(tmp_path):
    rej = [Reject("k1", "s.tar", "missing_json", "no json"), Reject("", "s.tar", "corrupt_shard", "cut")]
    write_rejects(str(tmp_path / "r.parquet"), rej)
    t = read_rejects(str(tmp_path / "r.parquet"))
    assert t.schema.equals(REJECTS_SCHEMA) and t.column("reason").to_pylist() == ["missing_json", "corrupt_shard"]
    assert count_reasons(t) == count_reasons(rej) == {"missing_json": 1, "corrupt_shard": 1}
    assert read_rejects(str(tmp_path / "none.parquet")).num_rows == 0
    with pytest.raises(ValueError, match="unknown reject reason 'bad'"):
        Reject("k", "s", "bad")


# --------------------------------------------------------------------------- crash safety, truncation, hashing


def test_every_root_metadata_write_is_a_complete_commit(tmp_path, monkeypatch):
    """zarr.json of the group is the commit: each write of it must describe a valid store
    (zarr's ``attrs.update`` writes zarr.json once per key: a kill between two writes left rows
    committed without their meta fields)."""
    import json

    import zarr

    from geopipe.pipeline.core import fsio

    store = tmp_path / "s.zarr"
    seen, real_set, real_atomic = [], zarr.storage.LocalStore.set, fsio.write_atomic

    def check(data: bytes) -> None:
        doc = json.loads(data)
        attrs = doc["attributes"]
        assert validate_store_attrs(attrs) == [], attrs
        assert attrs["rows"] == sum(r["n_ok"] for r in attrs["shards"].values())
        for name, node in doc.get("consolidated_metadata", {}).get("metadata", {}).items():  # describes the rows committed
            if name.split("/")[0] in ("embeddings", "latlon", "keys", "shard", "meta") and node.get("shape"):
                assert node["shape"][0] >= attrs["rows"], (name, node["shape"], attrs["rows"])
        seen.append((attrs["rows"], tuple(attrs["meta_fields"]), "consolidated_metadata" in doc))

    async def spy(self, key, value):
        if key == "zarr.json" and os.path.realpath(str(self.root)) == os.path.realpath(str(store)):
            check(value.to_bytes())
        return await real_set(self, key, value)

    def atomic_spy(url, data):
        if os.path.realpath(url) == os.path.realpath(str(store / "zarr.json")):
            check(data)
        return real_atomic(url, data)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", spy)
    monkeypatch.setattr(fsio, "write_atomic", atomic_spy)
    emb, ll = _rows(2, 7)
    with _writer(store) as w:
        w.append_shard("a.tar", emb, ll, ["k0", "k1"], {"x": ["1", "2"]}, [], STAT)
        real = w._commit
        w._commit = lambda update: (_ for _ in ()).throw(RuntimeError("crash"))
        with pytest.raises(RuntimeError):
            w.append_shard("b.tar", emb, ll, ["k2", "k3"], {"y": ["1", "2"]}, [], STAT)
        w._commit = real
    with _writer(store) as w:
        w.append_shard("b.tar", emb, ll, ["k2", "k3"], {"y": ["1", "2"]}, [], STAT)
        w.truncate(1)
    # one write per commit (with the consolidated metadata of that moment); reopening after the crash
    # commits the restored last chunk's digest, and the metadata again once the arrays are trimmed
    states = [state[:2] for state in seen]
    assert [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]] == [(0, ()), (2, ("x",)), (4, ("x", "y")), (2, ("x", "y"))]
    assert states.count((2, ("x",))) >= 2 and all(state[2] for state in seen[1:])  # only zarr's creation lacks it


def test_truncate_drops_later_shards_in_one_commit(tmp_path):
    store = tmp_path / "s.zarr"
    with _writer(store) as w:
        for i, n in enumerate((3, 2, 4)):
            emb, ll = _rows(n, 10 + i)
            w.append_shard(f"{i}.tar", emb, ll, [f"k{i}{j}" for j in range(n)], {},
                           [Reject(f"r{i}", f"{i}.tar", "missing_json")] * (i + 1), STAT)
            if i == 0:
                after_first = dict(w.attrs)
        assert w.truncate(1) == ["1.tar", "2.tar"]
        assert w.rows == 3 and list(w.shards) == ["0.tar"] and w.keys_seen == {"k00", "k01", "k02"}
        emb, ll = _rows(1, 20)
        w.append_shard("1.tar", emb, ll, ["k10"], {}, [], STAT)  # dropped keys may come back
        with pytest.raises(ValueError, match="cannot truncate"):
            w.truncate(5)
    s = open_store(str(store))
    assert s.rows == 4 and s.attrs["rejects"] == {"missing_json": 1} and s.rejects().num_rows == 1
    assert not (store / "rejects" / "part-000002.parquet").exists() and s.validate() == []
    with _writer(store) as w:
        w.truncate(1)
        assert w.attrs["fingerprint"] == after_first["fingerprint"]


def test_tar_reading_hashes_the_whole_file(tmp_path):
    import gzip
    import hashlib

    members = [(f"s{i}.{ext}", bytes([i]) * (300 + i)) for i in range(4) for ext in ("jpg", "json")]
    path = _tar(tmp_path / "t.tar", members)
    raw = open(path, "rb").read()
    cases = {"whole": raw, "cut": raw[:1700], "garbage": b"\x01" * 700}
    (tmp_path / "t.tar.gz").write_bytes(gzip.compress(raw))
    for name, data in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    for name in [*cases, "t"]:
        url = str(tmp_path / (f"{name}.tar" if name != "t" else "t.tar.gz"))
        info = {}
        try:
            for _ in iter_tar_samples(url, info):
                pass
        except CorruptShardError:
            assert name != "whole"
        assert info["sha256"] == hashlib.sha256(open(url, "rb").read()).hexdigest(), name


def test_remote_store_lock_is_skipped_with_a_warning_and_rejects_go_through_fsspec():
    import fsspec

    from geopipe.pipeline.core import fsio
    from geopipe.pipeline.core.lockfile import NullLock

    fs = fsspec.filesystem("memory")
    try:
        with pytest.warns(UserWarning, match="lock is local-only and is skipped"):
            lock = StoreWriter.lock("memory://geopipe-store-test/s.zarr")
        assert isinstance(lock, NullLock) and lock.held
        rej = [Reject("k", "s.tar", "missing_json", "d")]
        write_rejects("memory://geopipe-store-test/r.parquet", rej)
        assert read_rejects("memory://geopipe-store-test/r.parquet").column("key").to_pylist() == ["k"]
        assert read_rejects("memory://geopipe-store-test/none.parquet").num_rows == 0
        assert fsio.listdir("memory://geopipe-store-test") == ["r.parquet"]
        assert fsio.join("memory://geopipe-store-test/", "a", "b") == "memory://geopipe-store-test/a/b"
        assert fsio.normalize("file:///tmp/x") == "/tmp/x" and fsio.is_local("file:///tmp/x")
        assert not fsio.is_local("s3://bucket/x") and fsio.listdir("memory://geopipe-store-test/nothing") == []
    finally:
        fs.rm("/geopipe-store-test", recursive=True)

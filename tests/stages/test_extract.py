"""Extract stage end to end on generated WebDataset shards with the tiny backbone."""

import dataclasses
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from samples import good_sample, jpeg

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.lockfile import DirLock, LockedError
from geopipe.pipeline.ingest.shards import write_shards
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.writer import StoreMismatchError, StoreWriter, prepare_embeddings
from geopipe.schemas.store import validate_store_attrs
from geopipe.stages.extract import ExtractConfig, ShardChangedError, TooManyRejectsError, run_extract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny():
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec("tiny"))


def _good(key: str, i: int) -> dict:
    return good_sample(key, i, size=20, tags=[1])


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
    assert np.array_equal(da.latlon.view(np.uint64), db.latlon.view(np.uint64)) and np.array_equal(da.shard, db.shard)
    assert {k: v.tolist() for k, v in da.meta.items()} == {k: v.tolist() for k, v in db.meta.items()}
    for name in ("rows", "rejects", "meta_fields", "fingerprint", "backbone", "dtype", "normalized"):
        assert da.attrs[name] == db.attrs[name], name
    assert da.attrs["shards"] == db.attrs["shards"]  # same records: index, rows, counts, size, mtime, digest
    assert pq.read_table(a / "rejects" / "rejects.parquet").equals(pq.read_table(b / "rejects" / "rejects.parquet"))
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
        img = Image.open(io.BytesIO(jpeg(i))).convert("RGB")
        want, _ = prepare_embeddings(tiny.encode(tiny.preprocess(img)[None]).numpy(), "float16", True)
        np.testing.assert_allclose(d.embeddings[i].astype(np.float32), want[0].astype(np.float32), atol=2e-3)
    assert np.abs(np.linalg.norm(d.embeddings.astype(np.float32), axis=1) - 1).max() < 2e-3


def _bad_shard(tmp_path):
    jpg = jpeg(100)
    samples = [
        _good("g0", 0),
        {"__key__": "trunc", "jpg": jpg[: len(jpg) // 2], "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "nojson", "jpg": jpeg(1)},
        _good("g1", 1),
        {"__key__": "lat123", "jpg": jpeg(2), "json": {"latitude": 123.0, "longitude": 2.0}},
        {"__key__": "zero", "jpg": b"", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "listjson", "jpg": jpeg(3), "json": [1, 2]},
        {"__key__": "notimg", "jpg": b"this is not a jpeg", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "noimg", "json": {"latitude": 1.0, "longitude": 2.0}},
        {"__key__": "nanlon", "jpg": jpeg(4), "json": {"latitude": 1.0, "longitude": float("nan")}},
        {"__key__": "strlat", "jpg": jpeg(5), "json": {"latitude": "north", "longitude": 2.0}},
        {"__key__": "nolat", "jpg": jpeg(6), "json": {"longitude": 2.0}},
        {"__key__": "badjson", "jpg": jpeg(7), "json": b"{not json"},
        _good("g2", 2),
        {**_good("g1", 9)},  # duplicate key: the first g1 is kept
        _good("g3", 3),
    ]
    return write_shards(tmp_path / "bad", samples, "bad", 100)[0]


EXPECTED_REJECTS = [  # "nojson" is an unlabelled record, not a reject
    ("trunc", "corrupt_image"), ("lat123", "invalid_coordinates"),
    ("zero", "corrupt_image"), ("listjson", "invalid_json"), ("notimg", "corrupt_image"), ("noimg", "missing_image"),
    ("nanlon", "invalid_coordinates"), ("strlat", "invalid_coordinates"), ("nolat", "missing_coordinates"),
    ("badjson", "invalid_json"), ("g1", "duplicate_key"),
]


def test_bad_samples_are_skipped_counted_and_written(tmp_path, tiny):
    good = _world(tmp_path, n_shards=1, per_shard=3, prefix="ok")
    bad = _bad_shard(tmp_path)
    res = run_extract(_cfg([bad, *good], tmp_path / "s.zarr", max_reject_fraction=0.9), backbone=tiny)
    rej = pq.read_table(tmp_path / "s.zarr" / "rejects" / "rejects.parquet").to_pylist()
    assert [(r["key"], r["reason"]) for r in rej] == EXPECTED_REJECTS  # tar order
    assert {r["shard"] for r in rej} == {bad} and all(r["detail"] for r in rej)
    assert read_store(str(tmp_path / "s.zarr")).keys.tolist() == ["g0", "nojson", "g1", "g2", "g3", "ok0000", "ok0001", "ok0002"]
    want = {}
    for _, reason in EXPECTED_REJECTS:
        want[reason] = want.get(reason, 0) + 1
    assert res.rejects_by_reason == want and res.n_rejected == 11 and res.n_ok == 8 and res.n_unlabelled == 1
    assert open_store(str(tmp_path / "s.zarr")).attrs["rejects"] == want
    assert open_store(str(tmp_path / "s.zarr")).labelled == 7
    with pytest.raises(TooManyRejectsError, match="too many rejects: 11 of 16"):
        run_extract(_cfg([bad], tmp_path / "t.zarr", max_reject_fraction=0.5), backbone=tiny)
    # the shard that crossed the limit is not kept: the store stays valid, without it
    assert open_store(str(tmp_path / "t.zarr")).rows == 0
    with pytest.raises(TooManyRejectsError, match="11 of 16"):  # a retry redoes it and fails the same way
        run_extract(_cfg([bad], tmp_path / "t.zarr", max_reject_fraction=0.5), backbone=tiny)
    assert open_store(str(tmp_path / "t.zarr")).rows == 0
    res = run_extract(_cfg([bad], tmp_path / "t.zarr", max_reject_fraction=0.9), backbone=tiny)  # a higher limit redoes it
    assert res.n_ok == 5 and res.n_rejected == 11 and open_store(str(tmp_path / "t.zarr")).rows == 5


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
    rej = pq.read_table(tmp_path / "s.zarr" / "rejects" / "rejects.parquet").to_pylist()
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
    samples[13] = {"__key__": "r013", "jpg": jpeg(13)}
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


# A fork server: imports the CLI, torch and open_clip once, then forks one real `geopipe` process
# (own session, so SIGKILL reaches its DataLoader workers) per go-<name> file holding its argv;
# writes <name>.pid at once and <name>.rc (exit status, -9 when killed) once it has reaped it.
_ZYGOTE = r"""
import json, os, sys, time
import geopipe.flows.cli, geopipe.stages.extract, geopipe.pipeline.vision.backbones, open_clip
d, started, running = sys.argv[1], set(), {}

def put(name, text):
    with open(os.path.join(d, name + ".tmp"), "w") as fh:
        fh.write(text)
    os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))

put("ready", "")
while not os.path.exists(os.path.join(d, "stop")):
    for go in sorted(n for n in os.listdir(d) if n.startswith("go-") and n not in started):
        started.add(go)
        args = json.load(open(os.path.join(d, go)))
        pid = os.fork()
        if pid == 0:
            os.setsid()
            fd = os.open(os.path.join(d, go[3:] + ".log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1), os.dup2(fd, 2)
            sys.argv, code = ["geopipe", *args], 0
            try:
                geopipe.flows.cli.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        running[pid] = go[3:]
        put(go[3:] + ".pid", str(pid))
    pid, status = os.waitpid(-1, os.WNOHANG) if running else (0, 0)
    if pid:
        put(running.pop(pid) + ".rc", str(os.waitstatus_to_exitcode(status)))
    time.sleep(0.002)
"""


class _Zygote:
    def __init__(self, tmp_path):
        self.dir = tmp_path / "zygote"
        self.dir.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as conftest's in-process runs: same numerics, no oversubscription
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(self.dir)], cwd=ROOT, env=env)
        self.pids = {}

    def _wait_file(self, name, timeout=120.0):
        deadline = time.monotonic() + timeout
        while not (self.dir / name).exists():
            assert self.proc.poll() is None, "fork server died"
            assert time.monotonic() < deadline, f"timed out waiting for {name}"
            time.sleep(0.002)
        return (self.dir / name).read_text()

    def start(self, name, args) -> int:
        self._wait_file("ready")
        (self.dir / "argv.tmp").write_text(json.dumps(args))
        os.replace(self.dir / "argv.tmp", self.dir / f"go-{name}")
        self.pids[name] = int(self._wait_file(f"{name}.pid"))
        return self.pids[name]

    def rc(self, name, timeout=120.0) -> int:
        return int(self._wait_file(f"{name}.rc", timeout))

    def log(self, name) -> str:
        return (self.dir / f"{name}.log").read_text()

    def kill_when(self, name, condition, deadline=60.0):
        start = time.monotonic()
        while not condition():
            assert not (self.dir / f"{name}.rc").exists(), f"{name} ended before its kill point: {self.log(name)[-2000:]}"
            assert time.monotonic() - start < deadline, f"{name} never reached its kill point"
            time.sleep(0.002)
        os.killpg(self.pids[name], signal.SIGKILL)
        assert self.rc(name) == -signal.SIGKILL  # reaped: its pid is dead, the lock it left is stale

    def close(self):
        for name, pid in self.pids.items():
            if not (self.dir / f"{name}.rc").exists():
                os.killpg(pid, signal.SIGKILL)
        (self.dir / "stop").touch()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _committed_rows(store) -> int:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["rows"]
    except (OSError, ValueError, KeyError):  # not created yet
        return -1


def _lock_pid(store) -> int | None:
    try:
        return int((store / ".lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


@pytest.mark.e2e
def test_cli_extract_survives_kill_9_and_refuses_a_concurrent_writer(tmp_path, tiny):
    samples = [_good(f"k{i:03d}", i) for i in range(200)]
    samples[5] = {"__key__": "k005", "jpg": b"", "json": {"latitude": 0.0, "longitude": 0.0}}
    samples[77] = _good("k003", 77)  # duplicate across shards
    shards = write_shards(tmp_path / "shards", samples, "k", 20)
    store = tmp_path / "k.zarr"
    args = ["extract", str(tmp_path / "shards" / "k-{000000..000009}.tar"), "--store", str(store), "--batch-size", "4"]
    zygote = _Zygote(tmp_path)
    try:
        run_extract(_cfg(shards, tmp_path / "ref.zarr"), backbone=tiny)  # while the fork server imports
        k1 = zygote.start("k1", args + ["--workers", "0"])
        zygote.kill_when("k1", lambda: _lock_pid(store) == k1)  # start-up: lock just taken
        zygote.start("k2", args + ["--workers", "2"])
        zygote.kill_when("k2", lambda: _committed_rows(store) > 0)  # right after the first commit
        first = _committed_rows(store)
        k3 = zygote.start("k3", args + ["--workers", "1"])
        zygote.kill_when("k3", lambda: _committed_rows(store) >= first + 40)  # a few shards later
        assert 0 < _committed_rows(store) < 198 and _lock_pid(store) == k3  # its pid is left in the lock file (the flock itself died with it)
        a = zygote.start("a", args + ["--workers", "2"])
        deadline = time.monotonic() + 60
        while _lock_pid(store) != a:  # `a` took the lock at once and is extracting
            assert not (zygote.dir / "a.rc").exists() and time.monotonic() < deadline, zygote.log("a")[-2000:]
            time.sleep(0.002)
        t0 = time.monotonic()
        zygote.start("b", args + ["--workers", "0"])
        assert zygote.rc("b") == 1 and time.monotonic() - t0 < 10  # fails fast, before loading a backbone
        assert zygote.log("b").strip().splitlines() == [
            f"geopipe: error: {store} is locked by process {a} on {socket.gethostname()} (another extract or import is "
            f"writing it); wait for it to finish"]
        assert zygote.rc("a") == 0, zygote.log("a")[-2000:]
        assert "extracted" in zygote.log("a")
    finally:
        zygote.close()
    _same_store(tmp_path / "ref.zarr", store)  # keys, embeddings (bitwise), meta, rejects, records
    assert not (store / ".lock").exists()


def test_mismatch_and_lock_are_refused(tmp_path, tiny, monkeypatch):
    import socket

    shards = _world(tmp_path, n_shards=2, per_shard=3)
    store = tmp_path / "s.zarr"
    run_extract(_cfg(shards[:1], store), backbone=tiny)
    other = dataclasses.replace(tiny, identity={**tiny.identity, "fingerprint": "0" * 64})
    with pytest.raises(StoreMismatchError, match="refusing to append"):
        run_extract(_cfg(shards, store), backbone=other)
    resized = dataclasses.replace(tiny, identity={**tiny.identity, "preprocess": {**tiny.identity["preprocess"], "size": 96}})
    with pytest.raises(StoreMismatchError, match=r"differs in \['preprocess'\]"):
        run_extract(_cfg(shards, store), backbone=resized)
    with pytest.raises(StoreMismatchError, match="float32"):
        run_extract(_cfg(shards, store, dtype="float32"), backbone=tiny)
    assert open_store(str(store)).rows == 3
    # a live lock fails at once, before any backbone is loaded
    monkeypatch.setattr("geopipe.stages.extract._load_backbone", lambda *a: pytest.fail("loaded a backbone"))
    with DirLock(str(store)), pytest.raises(LockedError, match=f"locked by process {os.getpid()} on {socket.gethostname()}"):
        run_extract(_cfg(shards, store))


def test_a_rerun_with_nothing_new_loads_no_backbone_and_starts_no_cluster(tmp_path, tiny, monkeypatch):
    shards = _world(tmp_path, n_shards=2, per_shard=3)
    store = tmp_path / "s.zarr"
    run_extract(_cfg(shards, store), backbone=tiny)
    # doubt takes the full path, which says what differs
    other = dataclasses.replace(tiny, identity={**tiny.identity, "fingerprint": "0" * 64})
    with pytest.raises(StoreMismatchError, match="refusing to append"):
        run_extract(_cfg(shards, store), backbone=other)
    with pytest.raises(StoreMismatchError, match="float32"):
        run_extract(_cfg(shards, store, dtype="float32"), backbone=tiny)
    os.makedirs(store / ".staging" / "0-stale")  # what a killed --dask run leaves behind
    monkeypatch.setattr("geopipe.stages.extract._load_backbone", lambda *a: pytest.fail("loaded a backbone"))
    monkeypatch.setattr("geopipe.pipeline.core.parallel.dask_client", lambda *a, **k: pytest.fail("started a cluster"))
    for extra in ({}, {"dask": "local:2"}):
        r = run_extract(_cfg(shards, store, **extra))
        assert (r.shards_done, r.shards_skipped, r.n_ok) == (0, 2, 0)
        assert not (store / ".staging").exists()
    with pytest.raises(pytest.fail.Exception, match="loaded a backbone"):  # something new: the backbone is needed again
        run_extract(_cfg(_world(tmp_path / "more", n_shards=1, per_shard=2, prefix="m") + shards, store))


def _flip_byte(path):
    """Change one byte inside the first image, keeping size and mtime (only a content hash sees it)."""
    st = os.stat(path)
    offset = tarfile.open(path).getmembers()[0].offset_data + 200
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0x55]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_incremental_runs_changed_and_missing_shards(tmp_path, tiny):
    shards = _world(tmp_path, n_shards=4, per_shard=3)
    store = tmp_path / "s.zarr"
    r = run_extract(_cfg(shards[:2], store), backbone=tiny)
    assert (r.shards_done, r.shards_skipped, r.n_ok) == (2, 0, 6)
    r = run_extract(_cfg(shards, store), backbone=tiny)  # more shards: only the new ones
    assert (r.shards_done, r.shards_skipped, r.n_ok, r.shards_missing) == (2, 2, 6, ())
    recs = open_store(str(store)).attrs["shards"]
    assert [recs[u]["sha256"] for u in shards] == [hashlib.sha256(open(u, "rb").read()).hexdigest() for u in shards]
    r = run_extract(_cfg(shards[1:3], store), backbone=tiny)  # fewer shards: the others are reported, rows kept
    assert (r.shards_done, r.shards_skipped, r.shards_missing) == (0, 2, (shards[0], shards[3]))
    assert f"2 in the store but not given (rows kept, e.g. {shards[0]})" in r.summary()
    assert open_store(str(store)).rows == 12
    # touched, same bytes: changed by mtime, unchanged by content hash
    st = os.stat(shards[2])
    os.utime(shards[2], (1e9, 1e9))
    with pytest.raises(ShardChangedError, match=r"w-000002.tar changed since it was written .*\(modified 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d UTC, extracted from the version of .* UTC\); pass --on-changed skip"):
        run_extract(_cfg(shards, store), backbone=tiny)
    r = run_extract(_cfg(shards, store, verify_hash=True), backbone=tiny)
    assert (r.shards_done, r.shards_skipped, r.shards_changed) == (0, 4, ())
    os.utime(shards[2], ns=(st.st_atime_ns, st.st_mtime_ns))
    # one byte changed, same size and mtime: only the content hash sees it
    _flip_byte(shards[1])
    assert run_extract(_cfg(shards, store), backbone=tiny).shards_changed == ()
    with pytest.raises(ShardChangedError, match="content sha256 differs"):
        run_extract(_cfg(shards, store, verify_hash=True), backbone=tiny)
    before = read_store(str(store))
    r = run_extract(_cfg(shards, store, verify_hash=True, on_changed="skip"), backbone=tiny)
    assert (r.shards_done, r.shards_changed) == (0, (shards[1],)) and "1 changed (old rows kept" in r.summary()
    assert np.array_equal(read_store(str(store)).embeddings, before.embeddings)
    with pytest.raises(GeopipeError, match="would drop the later shard .*w-000003.tar"):
        run_extract(_cfg(shards[:3], store, verify_hash=True, on_changed="reextract"), backbone=tiny)
    # re-extraction truncates at the changed shard: the store equals a fresh extraction
    r = run_extract(_cfg(shards, store, verify_hash=True, on_changed="reextract"), backbone=tiny)
    assert (r.shards_done, r.shards_skipped, r.shards_changed) == (3, 1, (shards[1],)) and "re-extracted" in r.summary()
    run_extract(_cfg(shards, tmp_path / "fresh.zarr"), backbone=tiny)
    _same_store(tmp_path / "fresh.zarr", store)
    assert not np.array_equal(read_store(str(store)).embeddings[3], before.embeddings[3])  # the new image's


def test_embedding_key_stores_precomputed_embeddings_without_a_backbone(tmp_path, monkeypatch):
    from geopipe.pipeline.ingest.pairs import precomputed_identity

    vecs = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    samples = [{"__key__": f"e{i}", "street_clip.npy": vecs[i], "json": {"latitude": i, "longitude": -i}} for i in range(8)]
    samples[2]["street_clip.npy"] = vecs[2, :5]  # other width
    samples[3]["street_clip.npy"] = np.full(16, np.nan, dtype=np.float32)
    del samples[4]["street_clip.npy"]
    samples[5]["street_clip.npy"] = b"not an npy"
    samples[6]["street_clip.npy"] = vecs[6][None]  # (1, D) is accepted
    shards = write_shards(tmp_path / "shards", samples, "e", 4)
    monkeypatch.setattr("geopipe.stages.extract._load_backbone", lambda *a: pytest.fail("loaded a backbone"))
    cfg = _cfg(shards, tmp_path / "s.zarr", backbone="StreetCLIP", embedding_key="street_clip.npy", dtype="float32",
               max_reject_fraction=0.6)
    res = run_extract(cfg)
    d = read_store(str(tmp_path / "s.zarr"))
    assert d.keys.tolist() == ["e0", "e1", "e6", "e7"] and d.attrs["backbone"] == precomputed_identity("StreetCLIP", 16)
    want = vecs[[0, 1, 6, 7]] / np.linalg.norm(vecs[[0, 1, 6, 7]], axis=1, keepdims=True)
    np.testing.assert_allclose(d.embeddings, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(d.latlon[2], [6.0, -6.0])
    rej = open_store(str(tmp_path / "s.zarr")).rejects().to_pylist()
    assert [(r["key"], r["reason"]) for r in rej] == [(f"e{i}", "invalid_embedding") for i in (2, 3, 4, 5)]
    assert "width 5" in rej[0]["detail"] and "no 'street_clip.npy' entry" in rej[2]["detail"]
    assert res.rejects_by_reason == {"invalid_embedding": 4}
    with pytest.raises(StoreMismatchError, match="StreetCLIP"):
        run_extract(dataclasses.replace(cfg, backbone="OtherCLIP"))
    with pytest.raises(ValueError, match="no sample in 1 shard"):
        run_extract(dataclasses.replace(cfg, shards=(shards[0],), store=str(tmp_path / "t.zarr"), embedding_key="x.npy"))


def test_fsspec_urls_for_shards_and_store(tmp_path, tiny):
    import fsspec

    shards = _world(tmp_path, n_shards=2, per_shard=3)
    run_extract(_cfg(shards, tmp_path / "ref.zarr"), backbone=tiny)
    run_extract(_cfg([f"file://{u}" for u in shards], f"file://{tmp_path / 'f.zarr'}"), backbone=tiny)
    _same_store(tmp_path / "ref.zarr", tmp_path / "f.zarr")  # file:// urls are local paths, records included
    fs = fsspec.filesystem("memory")
    for u in shards:
        fs.pipe_file(f"/geopipe-extract-test/{os.path.basename(u)}", open(u, "rb").read())
    try:
        url = "memory://geopipe-extract-test/s.zarr"
        with pytest.warns(UserWarning, match="lock is local-only"):
            r = run_extract(_cfg(["memory://geopipe-extract-test/w-*.tar"], url), backbone=tiny)
        assert (r.shards_done, r.n_ok) == (2, 6) and not fs.exists("/geopipe-extract-test/s.zarr/.lock")
        ref, got = read_store(str(tmp_path / "ref.zarr")), read_store(url)
        assert got.keys.tolist() == ref.keys.tolist() and np.array_equal(got.embeddings, ref.embeddings)
        assert list(got.attrs["shards"]) == [f"memory:///geopipe-extract-test/w-00000{i}.tar" for i in (0, 1)]  # fsspec's form
        assert fs.exists("/geopipe-extract-test/s.zarr/rejects/rejects.parquet") and open_store(url).validate() == []
        with pytest.warns(UserWarning, match="lock is local-only"):
            r = run_extract(_cfg(["memory://geopipe-extract-test/w-*.tar"], url), backbone=tiny)
        assert (r.shards_done, r.shards_skipped) == (0, 2)
    finally:
        fs.rm("/geopipe-extract-test", recursive=True)


def test_precision_choices(tiny):
    import torch

    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fp32 = tiny.encode(x, "fp32")
    assert torch.equal(tiny.encode(x), fp32)  # auto is fp32 on CPU
    bf16 = tiny.encode(x, "bf16")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.99
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        tiny.encode(x, "fp8")
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        ExtractConfig(shards=("a",), store="s", precision="fp8")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(tmp_path, tiny):
    shards = _world(tmp_path, n_shards=3, per_shard=5)
    run_extract(_cfg(shards, tmp_path / "cpu.zarr", dtype="float32"), backbone=tiny)
    cpu = read_store(str(tmp_path / "cpu.zarr"))
    for precision, tol in (("fp32", 1e-4), ("bf16", 2e-2), ("fp16", 5e-3)):
        store = tmp_path / f"{precision}.zarr"
        run_extract(_cfg(shards, store, dtype="float32", device="cuda", precision=precision, num_workers=2))
        gpu = read_store(str(store))
        assert gpu.keys.tolist() == cpu.keys.tolist()
        assert 1 - (gpu.embeddings * cpu.embeddings).sum(axis=1).min() < tol, precision


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        ExtractConfig(shards=("a",), store="s", batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        ExtractConfig(shards=("a",), store="s", dtype="bfloat16")
    with pytest.raises(ValueError, match="meta field"):
        ExtractConfig(shards=("a",), store="s", meta_fields=("latitude",))
    with pytest.raises(ValueError, match="on_changed policy 'replace'"):
        ExtractConfig(shards=("a",), store="s", on_changed="replace")
    with pytest.raises(ValueError, match="embedding_key"):
        ExtractConfig(shards=("a",), store="s", embedding_key="street_clip.npy", pretrained="openai")
    assert ExtractConfig(shards="a.tar", store="s").shards == ("a.tar",)
    assert json.dumps(dataclasses.asdict(ExtractConfig(shards=["a"], store="s")))  # recorded in attrs

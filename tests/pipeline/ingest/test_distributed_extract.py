"""geopipe extract --dask: workers stage whole shards, the client commits them in order (real
LocalCluster with 2 worker processes, real SIGKILL of the client)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from procs import session_pids, store_rows
from samples import good_sample, jpeg

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.ingest.decode import SampleSpec
from geopipe.pipeline.ingest.distributed import STAGING_DIR, fragment_complete, read_fragment, write_fragment
from geopipe.pipeline.ingest.embed import shard_rows
from geopipe.pipeline.ingest.shards import shard_stat, write_shards
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.stages.extract import ExtractConfig, run_extract

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _good(key: str, i: int) -> dict:
    return good_sample(key, i, size=24)


def _world(root, n_shards: int, per_shard: int) -> list[str]:
    """Shards of good samples with bad ones mixed in: a corrupt image, a missing json, a key
    repeated across shards, an extra meta field appearing late."""
    samples = [_good(f"k{i:05d}", i) for i in range(n_shards * per_shard)]
    samples[2] = {"__key__": "trunc", "jpg": jpeg(2)[:100], "json": {"latitude": 1.0, "longitude": 2.0}}
    samples[per_shard + 1] = {"__key__": "nojson", "jpg": jpeg(3)}
    samples[2 * per_shard + 3] = _good("k00000", 5)  # duplicate of the first shard's first key
    samples[-1]["json"]["late"] = "x"
    return write_shards(root / "shards", samples, "d", per_shard)


def _cfg(shards, store, **kw) -> ExtractConfig:
    return ExtractConfig(shards=tuple(shards), store=str(store), **{"batch_size": 3, "num_workers": 0, "progress": False, **kw})


def _assert_same_store(a, b) -> None:
    da, db = read_store(str(a)), read_store(str(b))
    assert da.keys.tolist() == db.keys.tolist()
    assert np.array_equal(da.embeddings.view(np.uint16), db.embeddings.view(np.uint16))  # bit-identical
    assert np.array_equal(da.latlon.view(np.uint64), db.latlon.view(np.uint64)) and np.array_equal(da.shard, db.shard)
    assert {k: v.tolist() for k, v in da.meta.items()} == {k: v.tolist() for k, v in db.meta.items()}
    for name in ("rows", "rejects", "meta_fields", "fingerprint", "backbone", "dtype", "normalized", "shards"):
        assert da.attrs[name] == db.attrs[name], name  # shard records: index, rows, counts, size, mtime, digests
    assert pq.read_table(os.path.join(a, "rejects", "rejects.parquet")).equals(pq.read_table(os.path.join(b, "rejects", "rejects.parquet")))
    assert open_store(str(a)).rejects().equals(open_store(str(b)).rejects())
    assert not os.path.exists(os.path.join(b, STAGING_DIR))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_extract")
    shards = _world(root, n_shards=4, per_shard=7)
    run_extract(_cfg(shards, root / "ref.zarr"))
    return {"root": root, "shards": shards, "ref": str(root / "ref.zarr")}


def test_fragments_round_trip_exactly_and_partial_ones_are_not_complete(world, tmp_path):
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    url = world["shards"][0]
    stat = shard_stat(url)
    bb = load_backbone(BackboneSpec("tiny"))
    rows, sha, n = shard_rows(url, bb, SampleSpec(), 3, "auto", bb.embed_dim)
    assert n == 7 and len(rows.keys) == 6 and [r.reason for _, r in rows.rejects] == ["corrupt_image"]
    frag = str(tmp_path / "f")
    assert not fragment_complete(frag, url, stat)
    write_fragment(frag, url, stat, rows, sha, n)
    assert fragment_complete(frag, url, stat)
    back, sha2, n2 = read_fragment(frag)
    assert (sha2, n2, back.keys, back.idx, back.meta, back.rejects) == (sha, n, rows.keys, rows.idx, rows.meta, rows.rejects)
    assert np.array_equal(back.embeddings, rows.embeddings) and back.embeddings.dtype == rows.embeddings.dtype
    assert [tuple(x) for x in back.latlon] == [tuple(x) for x in rows.latlon]
    assert not fragment_complete(frag, url, type(stat)(stat.size, (stat.mtime or 0) + 1))  # the shard changed since
    with open(os.path.join(frag, "embeddings.npy"), "r+b") as fh:  # a torn file
        fh.truncate(50)
    assert not fragment_complete(frag, url, stat)


def test_fragments_live_on_fsspec_urls_too():
    from geopipe.pipeline.ingest.distributed import remove_staging
    from geopipe.pipeline.ingest.rows import ShardRows
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.rejects import Reject

    rows = ShardRows(idx=[0, 2], keys=["a", "b"], latlon=[(1.5, -2.25), (0.1, 0.2)], meta=[{"c": '"x"'}, {}],
                     embeddings=np.arange(8, dtype=np.float32).reshape(2, 4), rejects=[(1, Reject("z", "m.tar", "corrupt_image", "bad"))])
    stat, frag = ShardStat(10, 5.0), f"memory://dist-{os.getpid()}/s.zarr/{STAGING_DIR}/000000-abc"
    write_fragment(frag, "m.tar", stat, rows, "f00d", 3)
    assert fragment_complete(frag, "m.tar", stat)
    back, sha, n = read_fragment(frag)
    assert (back.keys, back.latlon, back.rejects, sha, n) == (rows.keys, rows.latlon, rows.rejects, "f00d", 3)
    remove_staging(f"memory://dist-{os.getpid()}/s.zarr")
    assert not fragment_complete(frag, "m.tar", stat)


def test_two_workers_give_the_single_process_store(world, tmp_path):
    store = tmp_path / "dask.zarr"
    res = run_extract(_cfg(world["shards"], store, dask="local:2"))
    ref = read_store(world["ref"])
    assert (res.n_ok, res.shards_done) == (ref.attrs["rows"], 4) and res.rejects_by_reason == ref.attrs["rejects"]
    _assert_same_store(world["ref"], str(store))  # (resumes: the kill tests)


def test_complete_fragments_are_reused_and_partial_ones_redone(world, tmp_path):
    from geopipe.pipeline.ingest.distributed import StageJob, fragment_name
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    shards, store = world["shards"], tmp_path / "r.zarr"
    run_extract(_cfg(shards[:1], store))  # a store a killed run left with its first shard committed
    bb = load_backbone(BackboneSpec("tiny"))
    job = StageJob("tiny", None, SampleSpec(), 3, "auto", "auto", embed_dim=bb.embed_dim)
    staging = store / STAGING_DIR
    rows, sha, n = shard_rows(shards[1], bb, SampleSpec(), 3, "auto", bb.embed_dim)
    rows.embeddings = rows.embeddings + np.float32(0.5)  # marked, so that the store shows whether it was reused
    write_fragment(str(staging / fragment_name(1, shards[1], shard_stat(shards[1]), job)), shards[1], shard_stat(shards[1]), rows, sha, n)
    partial = staging / fragment_name(2, shards[2], shard_stat(shards[2]), job)
    partial.mkdir()
    (partial / "embeddings.npy").write_bytes(b"torn")  # no marker: redone
    res = run_extract(_cfg(shards, store, dask="local:2"))
    assert (res.shards_done, res.shards_skipped) == (3, 1) and not staging.exists()
    got, ref = read_store(str(store)), read_store(world["ref"])
    assert got.keys.tolist() == ref.keys.tolist()
    one = got.shard == 1
    from geopipe.pipeline.store.format import prepare_embeddings

    marked, _ = prepare_embeddings(rows.embeddings, "float16", True)
    assert np.array_equal(got.embeddings[one], marked) and not np.array_equal(got.embeddings[one], ref.embeddings[one])
    assert np.array_equal(got.embeddings[~one], ref.embeddings[~one])  # the torn fragment was redone


def _damage(frag, how: str) -> None:
    """Change 5 rows of a complete fragment's embeddings.npy in place (same size, same mtime
    granularity): negated, or NaN."""
    path = os.path.join(frag, "embeddings.npy")
    size, emb = os.path.getsize(path), np.load(path)
    emb[:5] = -emb[:5] if how == "negate" else np.nan
    np.save(path, emb, allow_pickle=False)
    assert os.path.getsize(path) == size


def _stage(store, index: int, url: str, batch_size: int) -> str:
    """The fragment the CLI's worker would stage for shard ``url`` at record ``index``, written
    by the real worker function."""
    from geopipe.pipeline.ingest.distributed import StageJob, fragment_name, stage_shard

    job = StageJob("tiny", None, SampleSpec(), batch_size, "auto", "auto", embed_dim=read_store(str(store)).attrs["embed_dim"])
    frag = os.path.join(store, STAGING_DIR, fragment_name(index, url, shard_stat(url), job))
    return stage_shard(job, url, shard_stat(url), frag)


def test_damaged_fragments_are_redone_never_committed(world, tmp_path):
    from geopipe.stages.store_tools import StoreVerifyConfig, run_store_verify

    shards, store = world["shards"], tmp_path / "d.zarr"
    run_extract(_cfg(shards[:1], store))  # a store a killed run left with its first shard committed
    negated, nan = _stage(store, 1, shards[1], 3), _stage(store, 2, shards[2], 3)
    assert fragment_complete(negated, shards[1], shard_stat(shards[1]))
    _damage(negated, "negate")
    _damage(nan, "nan")
    assert not fragment_complete(negated, shards[1], shard_stat(shards[1])) and not fragment_complete(nan, shards[2], shard_stat(shards[2]))
    with pytest.raises(GeopipeError, match="embeddings.npy does not match the sha256"):
        read_fragment(negated)
    res = run_extract(_cfg(shards, store, dask="local:2"))
    assert (res.shards_done, res.shards_skipped) == (3, 1) and "invalid_embedding" not in res.rejects_by_reason
    _assert_same_store(world["ref"], str(store))  # no negated rows, no NaN rows turned into rejects
    assert run_store_verify(StoreVerifyConfig(str(store))).ok


def test_bad_dask_option_is_one_line():
    with pytest.raises(GeopipeError, match="local:N needs a whole number"):
        _cfg(["x.tar"], "s.zarr", dask="local:0")
    out = subprocess.run([sys.executable, "-m", "geopipe", "extract", "x.tar", "--store", "s.zarr", "--dask", "local:zero"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip().count("\n") == 0 and "local:N" in out.stderr


def _start_and_wait_for_a_commit(tmp_path):
    """A reference store, then `geopipe extract --dask local:2` in its own session, returned once
    it committed its first shard: (process, command, env, shards, reference, store, total rows)."""
    shards = _world(tmp_path, n_shards=16, per_shard=24)
    ref = tmp_path / "ref.zarr"
    run_extract(_cfg(shards, ref, batch_size=8))
    store = tmp_path / "k.zarr"
    cmd = [sys.executable, "-m", "geopipe", "extract", *shards, "--store", str(store), "--batch-size", "8", "--dask", "local:2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while store_rows(store) <= 0:  # poll for the first committed shard
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the distributed extract never committed a shard"
        time.sleep(0.005)
    return proc, cmd, env, shards, ref, store, read_store(str(ref)).attrs["rows"]


def _kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_client_resumes_to_the_same_store(tmp_path):
    proc, cmd, env, shards, ref, store, total = _start_and_wait_for_a_commit(tmp_path)
    try:
        session = session_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        at_kill = store_rows(store)
        at_kill_shards = len(json.loads((store / "zarr.json").read_text())["attributes"]["shards"])
        assert 0 < at_kill < total, "killed too late to test a resume"
        assert len(session) >= 3  # the client and its two Dask worker processes
        deadline = time.monotonic() + 20
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert session_pids(proc.pid) == [], "Dask workers of the killed client survived it"
    finally:
        _kill_session(proc.pid)
    first, staging = at_kill_shards, store / STAGING_DIR
    complete = [str(f) for f in staging.glob("*") if (f / "done.json").exists()] if staging.exists() else []
    if len(complete) < 2:  # the killed client left too few complete fragments: the worker function stages two
        complete = [_stage(store, first + j, shards[first + j], 8) for j in (0, 1)]
    _damage(complete[0], "negate")  # both found damaged on rerun and redone, never committed
    _damage(complete[1], "nan")
    stale = store / STAGING_DIR / "000000-0123456789abcdef"  # a fragment of other options, half written
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "embeddings.npy").write_bytes(b"junk")
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(shards) - at_kill_shards} shards extracted, {at_kill_shards} already done" in out.stderr, out.stderr[-3000:]
    _assert_same_store(str(ref), str(store))
    verify = subprocess.run([sys.executable, "-m", "geopipe", "store", "verify", str(store)], cwd=ROOT, capture_output=True, text=True)
    assert verify.returncode == 0 and ": OK" in verify.stdout + verify.stderr, verify.stdout + verify.stderr


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_worker_has_its_shard_redone(tmp_path):
    proc, cmd, env, shards, ref, store, total = _start_and_wait_for_a_commit(tmp_path)
    try:
        workers = []
        for pid in session_pids(proc.pid):
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"spawn_main" in fh.read():  # a Dask worker process (not the client, not the resource tracker)
                    workers.append(pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert store_rows(store) < total, "killed too late to test a redo"
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-3000:]
    finally:
        _kill_session(proc.pid)
    _assert_same_store(str(ref), str(store))


@pytest.mark.e2e
def test_bench_extract_dask_runs_and_stores_agree(tmp_path):
    from geopipe.stages.bench_extract import bench_extract_dask

    got = bench_extract_dask(backbone="tiny", pretrained=None, batch_size=4, num_workers=0, n_images=12, n_shards=3,
                             image_px=32, workdir=str(tmp_path))
    assert got["identical"] and got["n_images"] == 12 and got["dask"]["images_per_s"] > 0 and got["ratio_loop"] > 0

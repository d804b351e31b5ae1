"""Damaged stores on disk: truncated, bit-flipped, overwritten or deleted chunks of every array
(meta included) and rejects parts are found by the commit-time digests before any decoding,
reported as `array, chunk, rows, shard, what`; readers refuse them in one line; a decoder crash
is a reported problem; `store repair` drops the damaged shards and a re-append restores them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store import chunks
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import StoreError, read_store
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.verify import check_store, verify_store
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.store_tools import StoreRepairConfig, run_store_repair

D, PER, CHUNK = 8, 20, 16  # 4 shards of 20 rows in chunks of 16 rows: chunk 1 = rows [16, 32) spans shards 0 and 1


def _shard(s: int):
    rng = np.random.default_rng(s)
    emb = rng.normal(size=(PER, D))
    ll = np.column_stack([rng.uniform(-80, 80, PER), rng.uniform(-170, 170, PER)])
    return emb, ll, [f"k{s}_{i:02d}" for i in range(PER)], {"city": [json.dumps(f"c{s}{i}") for i in range(PER)]}


def _append(w: StoreWriter, s: int) -> None:
    emb, ll, keys, meta = _shard(s)
    w.append_shard(f"s{s}.tar", emb, ll, keys, meta, [Reject(f"bad{s}", f"s{s}.tar", "corrupt_image", "x")], ShardStat(1, 1.0))


def _open(path) -> StoreWriter:
    return StoreWriter.open(str(path), backbone={"name": "fake", "pretrained": None}, embed_dim=D, dtype="float32", chunk_rows=CHUNK)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("damage") / "good.zarr"
    with _open(path) as w:
        for s in range(4):
            _append(w, s)
    return path


@pytest.fixture
def store(good, tmp_path):
    path = tmp_path / "s.zarr"
    shutil.copytree(good, path)
    return path


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _garbage(f):
    f.write_bytes(os.urandom(f.stat().st_size))


@pytest.mark.parametrize("array, chunk, damage", [
    ("embeddings", "c/1/0", _truncate), ("latlon", "c/1/0", _flip), ("keys", "c/1", _garbage),
    ("shard", "c/1", _truncate), ("meta/city", "c/1", _garbage), ("meta/city", "c/1", os.unlink), ("coord", "c/0", _flip),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_array_chunk_is_checked_against_its_digest(store, array, chunk, damage):
    f = store.joinpath(*array.split("/"), *chunk.split("/"))
    if not f.exists():
        pytest.skip(f"{array} is not in this store layout")
    damage(f)
    check = check_store(str(store))
    where = f"{array}, chunk {chunk}, " + ("no record axis" if array == "coord" else "rows [16, 32), shard 0, 1")
    lines = [p for p in check.problems if p.startswith(where)]
    assert len(lines) == 1, check.problems
    assert ("the chunk file is missing" if damage is os.unlink else "differ from the digest recorded when it was committed") in lines[0]
    if array != "coord":
        assert check.damaged_shards == (0, 1)
    res = CliRunner().invoke(cli, ["store", "verify", str(store)])
    assert res.exit_code == 1 and "Traceback" not in res.output and where in res.output


def test_truncated_chunk_is_never_decoded_in_the_verifying_process(store, monkeypatch):
    """The suspect is decoded in a child; here a decoder that segfaults on it (a real SIGSEGV of
    the child) is a reported problem, and the remaining suspects are still decoded."""
    _truncate(store / "embeddings" / "c" / "1" / "0")
    _flip(store / "latlon" / "c" / "2" / "0")
    crashing = chunks._DECODER.replace('    try:\n', '    if path == "embeddings":\n        import os, signal\n'
                                       '        os.kill(os.getpid(), signal.SIGSEGV)\n    try:\n', 1)
    monkeypatch.setattr(chunks, "_DECODER", crashing)
    problems = verify_store(str(store))
    emb = [p for p in problems if p.startswith("embeddings, chunk c/1/0, rows [16, 32), shard 0, 1: ")]
    assert len(emb) == 1 and emb[0].endswith("decoding crashes the decoder (signal 11)")
    assert any(p.startswith("latlon, chunk c/2/0, rows [32, 48), shard 1, 2: its bytes") for p in problems)


def test_readers_refuse_a_damaged_chunk_in_one_line(store):
    _flip(store / "latlon" / "c" / "0" / "0")
    with pytest.raises(StoreError, match=r"array latlon, chunk c/0/0 \(rows \[0, 16\)\) is damaged: .*geopipe store verify"):
        read_store(str(store))
    s_args = ["--store", str(store)]
    res = CliRunner().invoke(cli, ["train", *s_args, "-o", str(store.parent / "m"), "--dim", "16", "--depth", "1", "--steps", "2",
                                   "--warmup", "0", "--device", "cpu", "--in-memory"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "array latlon, chunk c/0/0" in res.output


def test_damaged_rejects_are_reported_not_raised(store):
    (store / "rejects" / "part-000002.parquet").write_bytes(b"PAR1 not really")
    consolidated = store / "rejects" / "rejects.parquet"
    if not consolidated.exists():
        consolidated = store / "rejects.parquet"
    consolidated.write_bytes(b"garbage")
    check = check_store(str(store))
    assert any(p.startswith("rejects part ") and "shard 2 (s2.tar): its bytes differ" in p for p in check.problems), check.problems
    assert any("cannot be read" in p and "rejects.parquet" in p for p in check.problems), check.problems
    assert check.damaged_shards == (2,)


def test_older_stores_say_which_arrays_are_not_covered(store):
    attrs_file = store / "zarr.json"
    doc = json.loads(attrs_file.read_text())
    del doc["attributes"][chunks.CHUNK_DIGESTS_ATTR]
    attrs_file.write_text(json.dumps(doc))
    check = check_store(str(store))
    assert check.problems == () and len(check.notes) == 1
    assert "not covered by chunk digests" in check.notes[0] and "embeddings" in check.notes[0] and "meta/city" in check.notes[0]
    res = CliRunner().invoke(cli, ["store", "verify", str(store)])
    assert res.exit_code == 0 and "note: not covered by chunk digests" in res.output
    _truncate(store / "keys" / "c" / "2")  # no digest: found by decoding it (in the child)
    assert any(p.startswith("keys, chunk c/2, rows [32, 48), shard 1, 2: decoding fails") for p in verify_store(str(store)))


def test_repair_drops_the_damaged_shards_and_a_rerun_restores_the_store(store, good):
    _garbage(store / "meta" / "city" / "c" / "2")  # rows [32, 48): shards 1 and 2
    res = CliRunner().invoke(cli, ["store", "repair", str(store)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (f"{store}: dropped 3 shard(s) from s1.tar on (20 rows kept); "
                                  f"run the same extract/import again to write them anew")
    assert verify_store(str(store)) == []
    with _open(store) as w:
        for s in (1, 2, 3):
            _append(w, s)
    assert verify_store(str(store)) == []
    a, b = read_store(str(store)), read_store(str(good))
    assert np.array_equal(a.embeddings, b.embeddings) and list(a.keys) == list(b.keys)
    assert list(a.meta["city"]) == list(b.meta["city"])
    assert run_store_repair(StoreRepairConfig(str(store))).dropped == ()


def test_an_interrupted_append_is_restored_when_the_next_writer_opens(tmp_path):
    """A writer killed before its commit rewrote the last committed chunk with rows it never
    committed; the next writer writes the committed rows back and commits the chunk's digest."""
    store = tmp_path / "s.zarr"
    with _open(store) as w:
        for s in range(3):  # 60 rows: the last chunk [48, 64) is partly committed
            _append(w, s)
    w = _open(store)
    w._commit = lambda update: (_ for _ in ()).throw(RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        _append(w, 4)
    w._lock.release()
    assert any("differ from the digest" in p for p in verify_store(str(store)))
    _open(store).close()
    assert verify_store(str(store)) == []


def test_cli_verify_names_the_repair(store):
    _truncate(store / "embeddings" / "c" / "3" / "0")  # rows [48, 64): shards 2 and 3
    res = CliRunner().invoke(cli, ["store", "verify", str(store)])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert lines[0].startswith(f"{store}: ") and lines[0].endswith(" problem(s)")
    assert any(line.startswith("  - embeddings, chunk c/3/0, rows [48, 64), shard 2, 3: its bytes") for line in lines)
    assert lines[-1].startswith(f"  repair: `geopipe store repair {store}` drops shard 2 and every later one")


def test_store_damage_errors_are_geopipe_errors():
    assert issubclass(StoreError, GeopipeError)

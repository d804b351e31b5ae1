"""Store hygiene (issue 22, item 9): temporary files of killed atomic writes (real SIGKILLs) are
removed by the next writer, those a live writer may own are not; a verify message is never cut
mid-word; a huge value in the store attributes is refused in one line, before anything is written."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.hierarchy import stale_temporaries
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.verify import _first_line, check_store, verify_store
from geopipe.pipeline.store.writer import StoreWriter

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "store_2026_12.zarr")
BACKBONE = {"name": "t"}


def _write(path, shards=(0, 1, 2)) -> str:
    with StoreWriter.open(str(path), backbone=BACKBONE, embed_dim=4, dtype="float32", chunk_rows=4) as w:
        for s in shards:
            rng = np.random.default_rng(s)
            keys = [f"s{s}_{i}" for i in range(3)]
            rejects = [Reject(f"bad{s}_{j}", f"s{s}.tar", "corrupt_image", "x") for j in range(s + 1)]
            w.append_shard(f"s{s}.tar", rng.normal(size=(3, 4)), rng.uniform(-9, 9, (3, 2)), keys, {}, rejects, ShardStat(1, 0.0))
    return str(path)


def _verify(path) -> tuple[int, list[str]]:
    res = CliRunner().invoke(cli, ["store", "verify", str(path)])
    return res.exit_code, res.output.strip().splitlines()


def _advice(lines: list[str]) -> list[str]:
    """The command verify's repair line names, as argv."""
    (line,) = [x for x in lines if x.startswith("  repair: ")]
    return re.search(r"`geopipe (store repair [^`]+)`", line).group(1).split()


_KILLED_WRITER = r"""
import sys, time
from geopipe.pipeline.core import fsio
with fsio.atomic_path(sys.argv[1]) as tmp:
    open(tmp, "wb").write(b"half a rejects table")
    print("writing", flush=True)
    time.sleep(60)
"""


def _killed_write(target: str) -> None:
    """A real atomic write SIGKILLed halfway: it leaves its temporary file beside ``target``."""
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, target], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_temporary_files_of_killed_writes_are_removed_by_the_next_writer(tmp_path):
    path = _write(tmp_path / "s.zarr", shards=(0,))
    _killed_write(os.path.join(path, "rejects", "rejects.parquet"))
    _killed_write(os.path.join(path, "zarr.json"))
    partial = os.path.join(path, "embeddings", "c", "0", "0." + "ab" * 16 + ".partial")  # what zarr's LocalStore leaves
    open(partial, "wb").write(b"x")
    staged = os.path.join(path, ".staging", "0-x", ".embeddings.npy." + "cd" * 6 + ".tmp")  # the distributed extract's own
    os.makedirs(os.path.dirname(staged))
    open(staged, "wb").write(b"x")
    left = stale_temporaries(path)
    assert len(left) == 3 and staged not in left
    check = check_store(path)
    assert check.problems == () and any(n.startswith("3 temporary file(s) of killed writes") for n in check.notes)
    time.sleep(0.05)  # the lock taken next is newer than them
    with StoreWriter.open(path, backbone=BACKBONE, embed_dim=4, dtype="float32") as w:
        assert w.housekeeping["temporary files removed"] == 3
        assert stale_temporaries(path) == [] and os.path.exists(staged)
        _killed_write(os.path.join(path, "rejects", "part-000009.parquet"))  # newer than the held lock: a live writer's
        assert len(stale_temporaries(path)) == 1
        w.append_shard("s1.tar", np.ones((1, 4)), [[1.0, 2.0]], ["n"], {}, [], ShardStat(1, 0.0))
    assert len(stale_temporaries(path)) == 1  # kept while that writer held the lock; the next one removes it
    res = CliRunner().invoke(cli, ["store", "repair", path])
    assert res.exit_code == 0 and "temporary files removed" in res.output and stale_temporaries(path) == []
    assert verify_store(path) == []


def test_verify_messages_are_never_cut_mid_word(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / ("and-another-one-" * 4)
    path = _write(deep / "s.zarr")
    open(os.path.join(path, "rejects", "rejects.parquet"), "wb").write(b"PAR1" + b"\0" * 200 + b"PAR1")
    problems = verify_store(path)
    line = next(p for p in problems if "rejects.parquet cannot be read" in p)
    assert line.endswith("`geopipe store repair` rebuilds it from the parts") and "check the store w)" not in line
    assert "geopipe store verify" not in line  # the reader's own advice is not repeated inside verify's
    long = _first_line(ValueError("word " * 100), limit=50)
    assert long == ("word " * 10).strip() + " …" and _first_line(ValueError("short")) == "short"


def test_a_huge_value_in_the_store_attributes_is_refused_in_one_line(tmp_path):
    big = {"version": "t", "config": {"note": "x" * (20 << 20)}}  # 20 MiB: every reader would parse it on every open
    t0 = time.perf_counter()
    with pytest.raises(GeopipeError, match=r"attribute 'created_by' would take 20\.0 MiB .* \(limit 1\.0 MiB") as err:
        StoreWriter.open(str(tmp_path / "s.zarr"), backbone=BACKBONE, embed_dim=4, created_by=big)
    assert "\n" not in str(err.value) and time.perf_counter() - t0 < 10
    assert os.listdir(tmp_path / "s.zarr") == []  # nothing written, the lock released
    with StoreWriter.open(str(tmp_path / "s.zarr"), backbone=BACKBONE, embed_dim=4, created_by=big, max_attr_bytes=64 << 20):
        pass  # the bound is a parameter
    path = _write(tmp_path / "t.zarr", shards=(0,))
    with StoreWriter.open(path, backbone=BACKBONE, embed_dim=4, dtype="float32") as w:
        with pytest.raises(GeopipeError, match="a shard url of 2.0 MiB"):
            w.append_shard("u" * (2 << 20), np.ones((1, 4)), [[1.0, 2.0]], ["n"], {}, [], ShardStat(1, 0.0))
    assert verify_store(path) == []
    import pyarrow as pa

    np.save(tmp_path / "e.npy", np.ones((2, 4), np.float32))
    pq.write_table(pa.table({"key": ["a", "b"], "latitude": [1.0, 2.0], "longitude": [3.0, 4.0]}), tmp_path / "e.parquet")
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "e.npy"), "--store", str(tmp_path / "i.zarr"),
                                   "--backbone-name", "B" * (2 << 20)])  # a 2 MiB model name
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output[:500]
    assert "2.0 MiB of the store's zarr.json (limit 1.0 MiB" in res.output


def test_a_creation_killed_while_writing_the_root_is_started_again(tmp_path):
    path = tmp_path / "s.zarr"
    path.mkdir()
    (path / ("zarr." + "ef" * 16 + ".partial")).write_bytes(b"{")  # zarr's temporary root metadata, its writer killed
    (path / "embeddings").mkdir()
    assert verify_store(_write(path, shards=(0,))) == [] and stale_temporaries(str(path)) == []

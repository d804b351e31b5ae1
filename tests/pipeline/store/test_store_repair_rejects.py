"""A deleted or damaged rejects.parquet (the consolidated rejects) is rebuilt from its per-shard parts
by `geopipe store repair`, the command verify names (issue 22, item 5); a damaged part drops its
shard instead; repairing a healthy store does nothing, an older one is brought up to date."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.verify import check_store, verify_store
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


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate", "stale"])
def test_a_deleted_or_damaged_rejects_parquet_is_rebuilt_by_the_repair_verify_names(tmp_path, damage):
    path = _write(tmp_path / "s.zarr")
    consolidated = os.path.join(path, "rejects", "rejects.parquet")
    want = pq.read_table(consolidated)
    assert want.num_rows == 6
    if damage == "delete":
        os.remove(consolidated)
    elif damage == "garbage":
        open(consolidated, "wb").write(os.urandom(os.path.getsize(consolidated)))
    elif damage == "truncate":
        open(consolidated, "r+b").truncate(os.path.getsize(consolidated) // 2)
    else:  # a valid Parquet file with the rows of shard 0 only
        shutil.copy(os.path.join(path, "rejects", "part-000000.parquet"), consolidated)
    code, lines = _verify(path)
    assert code == 1 and any("rejects/rejects.parquet" in x and x.endswith("`geopipe store repair` rebuilds it from the parts")
                             for x in lines), lines
    res = CliRunner().invoke(cli, _advice(lines))
    assert res.exit_code == 0 and res.output.strip() == f"{path}: rejects.parquet rebuilt from its parts", res.output
    code, lines = _verify(path)
    assert pq.read_table(consolidated).equals(want) and code == 0 and lines[0].startswith(f"{path}: OK, 9 rows")
    assert open_store(path).rejects().equals(want)


def test_a_damaged_part_drops_its_shard_and_the_rest_is_rebuilt(tmp_path):
    path = _write(tmp_path / "s.zarr")
    open(os.path.join(path, "rejects", "part-000001.parquet"), "wb").write(b"PAR1 not really")
    os.remove(os.path.join(path, "rejects", "rejects.parquet"))
    code, lines = _verify(path)
    assert code == 1 and _advice(lines) == ["store", "repair", path]
    res = CliRunner().invoke(cli, _advice(lines))
    assert res.exit_code == 0 and res.output.startswith(f"{path}: dropped 2 shard(s) from s1.tar on (3 rows kept)"), res.output
    assert verify_store(path) == [] and open_store(path).rejects().num_rows == 1
    with StoreWriter.open(path, backbone=BACKBONE, embed_dim=4, dtype="float32") as w:  # the rerun that writes them anew
        assert sorted(w.shards) == ["s0.tar"]
    _write(tmp_path / "ref.zarr")
    shutil.rmtree(path)
    assert verify_store(_write(tmp_path / "s.zarr")) == []


def test_repairing_a_healthy_store_does_nothing_and_an_old_one_is_brought_up_to_date(tmp_path):
    path = _write(tmp_path / "s.zarr")
    res = CliRunner().invoke(cli, ["store", "repair", path])
    assert res.exit_code == 0 and res.output.strip() == f"{path}: nothing to repair"
    old = str(tmp_path / "old.zarr")
    shutil.copytree(FIXTURE, old)
    res = CliRunner().invoke(cli, ["store", "repair", old])
    assert res.exit_code == 0 and res.output.strip() == f"{old}: rejects node written; consolidated metadata written", res.output
    assert check_store(old).notes == ()



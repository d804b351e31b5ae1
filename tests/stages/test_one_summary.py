"""extract and import print one summary line (before: import printed the library's line on stderr
and its own on stdout)."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.stages.demo import DemoDataConfig, run_demo_data

_SUMMARY = re.compile(r"^(extract|import) → .*: \d+ ok", re.M)


def test_import_prints_one_summary(tmp_path):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32))
    pq.write_table(pa.table({"key": ["a0", "a1", "a2"], "latitude": [1.0, 2.0, 3.0], "longitude": [4.0, 5.0, 6.0]}), tmp_path / "a.parquet")
    r = CliRunner().invoke(cli, ["import", str(tmp_path / "a.npy"), "--store", str(tmp_path / "s.zarr"), "--backbone-name", "E"])
    assert r.exit_code == 0, r.output
    assert len(_SUMMARY.findall(r.output)) == 1 and "imported " not in r.output, r.output


def test_extract_prints_one_summary(tmp_path):
    shards = run_demo_data(DemoDataConfig(out=str(tmp_path / "w"), n_train=20, n_test=10, shard_size=20, image_size=16)).shards
    r = CliRunner().invoke(cli, ["extract", shards[-1], "--store", str(tmp_path / "s.zarr"), "--workers", "0", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert len(_SUMMARY.findall(r.output)) == 1, r.output

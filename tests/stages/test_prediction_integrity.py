"""Damaged predictions are never scored silently: every page carries a CRC-32 verified on read, a
dataset's _metadata records each part's SHA-256, and evaluate (and every other reader) names the
damaged file or part in one line. Damage is real: 64 zeroed bytes in a file on disk."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.predictions import read_columns, read_predictions
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.predict import PredictConfig, run_predict
from tests.tiny_models import tiny_store, untrained_checkpoint

N = 96


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    base = dict(checkpoint=untrained_checkpoint(root / "m"), store=tiny_store(root / "s.zarr", N), steps=2, nll=True, device="cpu",
                progress=False)
    run_predict(PredictConfig(out=str(root / "p.parquet"), **base))
    run_predict(PredictConfig(out=str(root / "ds"), **base))
    return root, base


def _zero(path, offset: int, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(n)
    path.write_bytes(bytes(data))


def _parts(ds) -> list:
    return sorted(ds.glob("part-*.parquet"))


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_metadata_records_each_parts_digest(made):
    from geopipe.pipeline.artifacts.predictions import dataset_listing

    root, _ = made
    names, digests = dataset_listing(str(root / "ds"))
    assert names == [p.name for p in _parts(root / "ds")] and len(names) >= 8
    for p in _parts(root / "ds"):
        data = p.read_bytes()
        assert digests[p.name]["sha256"] == hashlib.sha256(data).hexdigest() and digests[p.name]["bytes"] == len(data)
    assert sum(d["rows"] for d in digests.values()) == N


def test_evaluate_names_a_damaged_part(made, tmp_path):
    """Before: 64 zeroed bytes in the middle of a part: evaluate exited 0 with other numbers."""
    root, _ = made
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    victim = _parts(ds)[3]
    _zero(victim, victim.stat().st_size // 2)
    line = _one_line(CliRunner().invoke(cli, ["evaluate", str(ds)]))
    assert f"part '{victim}' is damaged" in line and "rerun the same `geopipe predict`" in line, line
    with pytest.raises(GeopipeError, match=f"part '{victim}' is damaged"):
        read_columns(str(ds), ["u_dist1", "key"])  # evaluate --uncertainty's reader
    from geopipe.flows.locate import located_rows

    with pytest.raises(GeopipeError, match=f"part '{victim}' is damaged"):
        located_rows(str(ds))


def test_evaluate_names_a_damaged_file(made, tmp_path):
    """Before: zeroed bytes in a data page of a single file's lon column changed its longitudes silently."""
    root, _ = made
    path = tmp_path / "p.parquet"
    shutil.copy(root / "p.parquet", path)
    md = pq.ParquetFile(path).metadata
    rg = md.row_group(md.num_row_groups // 2)
    lon = next(rg.column(i) for i in range(rg.num_columns) if rg.column(i).path_in_schema == "lon")
    _zero(path, lon.data_page_offset + lon.total_compressed_size // 2, 16)
    line = _one_line(CliRunner().invoke(cli, ["evaluate", str(path)]))
    assert f"predictions file '{path}' is damaged" in line, line


def test_zeroed_bytes_anywhere_are_an_error_or_change_nothing(made, tmp_path):
    """64 zeroed bytes at every 61st offset of a file of one 96-row row group: read_predictions
    raises one GeopipeError or returns the very same numbers (damage in a column it does not read).
    Before: 49 of 291 offsets gave other numbers silently (zeroed literals inside snappy pages)."""
    root, base = made
    one = tmp_path / "one.parquet"
    run_predict(PredictConfig(out=str(one), min_partitions=1, **base))
    assert pq.ParquetFile(one).num_row_groups == 1
    good = one.read_bytes()
    ref, _ = read_predictions(str(one))
    path, outcomes = tmp_path / "p.parquet", {"error": 0, "same": 0}
    for offset in range(4, len(good) - 8, 61):
        path.write_bytes(good)
        _zero(path, offset)
        try:
            cols, _ = read_predictions(str(path))
        except GeopipeError:
            outcomes["error"] += 1
            continue
        assert cols["key"] == ref["key"], offset
        for name, values in ref.items():
            if name != "key":
                np.testing.assert_array_equal(cols[name], values, err_msg=f"{name} at offset {offset}")
        outcomes["same"] += 1
    assert outcomes["error"] > 100, outcomes


def test_a_rerun_writes_a_damaged_part_again(made, tmp_path, capfd):
    root, base = made
    ds = tmp_path / "ds"
    shutil.copytree(root / "ds", ds)
    victim = _parts(ds)[5]
    _zero(victim, victim.stat().st_size // 2)
    res = run_predict(PredictConfig(out=str(ds), **base))
    assert (res.parts_written, res.parts_skipped) == (1, len(_parts(ds)) - 1)
    assert f"part {victim.name} of {ds} is damaged; scoring it again" in capfd.readouterr().err
    assert pq.read_table(victim).equals(pq.read_table(root / "ds" / victim.name))  # the first run's rows
    assert read_predictions(str(ds))[0]["lon"].tolist() == read_predictions(str(root / "ds"))[0]["lon"].tolist()

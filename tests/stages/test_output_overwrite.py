"""No silent overwrite: predict, retrieve, evaluate -o and map refuse an existing output in one
line unless --overwrite; predict -o FILE streams its row groups to disk (memory holds one
partition, never the file) and moves the file into place at the end."""

from __future__ import annotations

import hashlib
import os
import tracemalloc

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages import predict as predict_stage
from geopipe.stages.predict import PredictConfig, run_predict
from tests.tiny_models import tiny_store, untrained_checkpoint

N = 96


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite")
    return {"store": tiny_store(root / "s.zarr", N), "ckpt": untrained_checkpoint(root / "m"), "root": root}


def _digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _one_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_predict_twice_into_one_file_refuses_without_overwrite(tiny, tmp_path):
    """Before: the second predict silently replaced the first file (an --nll run lost). After: one
    line, the first file byte for byte as it was; --overwrite replaces it."""
    out = tmp_path / "p.parquet"
    args = ["predict", "-c", tiny["ckpt"], "--store", tiny["store"], "-o", str(out), "--steps", "2", "--device", "cpu"]
    first = CliRunner().invoke(cli, [*args, "--nll"])
    assert first.exit_code == 0, first.output
    before = _digest(out)
    line = _one_line(CliRunner().invoke(cli, args))
    assert line == f"geopipe: error: {out} exists; pass --overwrite to replace it, or choose another -o"
    assert _digest(out) == before and pq.read_table(out).column("log_likelihood").null_count == 0
    third = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert third.exit_code == 0, third.output
    assert pq.read_table(out).column("log_likelihood").null_count == N  # replaced by the run without --nll
    assert sorted(os.listdir(tmp_path)) == ["p.parquet"]  # no temporary left behind


def test_predict_file_streams_row_groups_to_disk(tiny, tmp_path, monkeypatch):
    """Before: the whole file was built in an in-memory buffer and written at the end (memory grew
    with records × samples). After: each partition is a row group on disk before the next one is
    scored; the memory held between partitions does not grow, and writing the footer and moving
    the file adds under a quarter of the file to the peak of scoring one partition."""
    out = tmp_path / "p.parquet"
    on_disk, held, peaks = [], [], []
    score = predict_stage._predict_table

    def watched(cfg, start, stop):
        on_disk.append(sum(e.stat().st_size for e in os.scandir(tmp_path) if e.name.startswith(".p.parquet.") and e.name.endswith(".tmp")))
        held.append(tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0)
        tracemalloc.reset_peak()
        table = score(cfg, start, stop)
        peaks.append(tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else 0)
        return table

    monkeypatch.setattr(predict_stage, "_predict_table", watched)
    cfg = PredictConfig(checkpoint=tiny["ckpt"], store=tiny["store"], out=str(out), steps=2, samples=4096, batch_size=8,
                        device="cpu", progress=False)
    run_predict(cfg)  # loads and caches the model: the measured run below allocates predictions only
    os.remove(out)
    for seen in (on_disk, held, peaks):
        seen.clear()
    tracemalloc.start()
    try:
        run_predict(cfg)
        last = tracemalloc.get_traced_memory()[1]  # since the last partition began: its scoring, then the footer and the move
    finally:
        tracemalloc.stop()
    size = os.path.getsize(out)
    assert len(on_disk) == pq.ParquetFile(out).num_row_groups >= 8 and pq.read_table(out).num_rows == N
    assert on_disk[0] <= 4 and all(b > a for a, b in zip(on_disk, on_disk[1:])), on_disk  # 4: the "PAR1" magic
    assert size > 5e6 and max(held) - min(held) < size / 8, (held, size)
    assert last < max(peaks) + size / 4, (last, max(peaks), size)


def test_retrieve_and_evaluate_refuse_an_existing_output(tiny, tmp_path):
    db = tiny_store(tmp_path / "db.zarr", 20)
    out, report = tmp_path / "r.parquet", tmp_path / "report.json"
    args = ["retrieve", "--query", tiny["store"], "--database", db, "-o", str(out), "-k", "3"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = _digest(out)
    assert _one_line(CliRunner().invoke(cli, args)) == f"geopipe: error: {out} exists; pass --overwrite to replace it, or choose another -o"
    assert _digest(out) == before
    assert CliRunner().invoke(cli, [*args, "--overwrite"]).exit_code == 0
    ev = ["evaluate", str(out), "-o", str(report)]
    assert CliRunner().invoke(cli, ev).exit_code == 0
    text = report.read_text()
    assert _one_line(CliRunner().invoke(cli, ev)) == f"geopipe: error: {report} exists; pass --overwrite to replace it, or choose another -o"
    assert report.read_text() == text
    assert CliRunner().invoke(cli, [*ev, "--overwrite"]).exit_code == 0


def test_map_refuses_to_replace_an_earlier_map(tiny, tmp_path):
    (tmp_path / "map-rec_0.png").write_bytes(b"an earlier map")
    args = ["map", "-c", tiny["ckpt"], "--store", tiny["store"], "-o", str(tmp_path), "--key", "rec/0", "--mode", "kde",
            "--kde-samples", "64", "--resolution", "30", "--region", "0", "--device", "cpu"]
    line = _one_line(CliRunner().invoke(cli, args))
    assert line.startswith(f"geopipe: error: {tmp_path} already holds 1 file(s) this map writes (map-rec_0.png") and "--overwrite" in line
    assert (tmp_path / "map-rec_0.png").read_bytes() == b"an earlier map"
    res = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "map-rec_0.png").read_bytes()[:4] == b"\x89PNG"


def test_a_file_written_meanwhile_is_never_replaced(tmp_path):
    """Two runs into one new file: the one that finishes second is refused, the first one's file stays."""
    import numpy as np

    from geopipe.pipeline.artifacts.outputs import PredictionsStream

    out = tmp_path / "p.parquet"
    cols = {"key": ["a", "b"], "lat": np.array([1.0, 2.0]), "lon": np.array([3.0, 4.0])}
    with PredictionsStream(str(out)) as slow:
        slow.write(cols, 2)
        with PredictionsStream(str(out)) as fast:
            fast.write({**cols, "key": ["x", "y"]}, 2)
            fast.finish({b"geopipe": b"{}"})
        with pytest.raises(GeopipeError, match="was created by another run while this one wrote it; pass --overwrite"):
            slow.finish({b"geopipe": b"{}"})
    assert pq.read_table(out).column("key").to_pylist() == ["x", "y"] and os.listdir(tmp_path) == ["p.parquet"]

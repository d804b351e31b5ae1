"""One writer per predictions output: a predict (or locate) holds the output's lock while it runs,
a second run into the same dataset directory or file is refused in one line naming the first
one's process, and a holder killed with SIGKILL leaves no stale lock. Real processes, real kills."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.predictions import read_predictions
from geopipe.stages.predict import PredictConfig, run_predict
from tests.tiny_models import tiny_store, untrained_checkpoint

N = 64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A real `predict` in its own process, each partition slowed down so that the test can act while it runs.
_SLOW = textwrap.dedent("""
    import sys, time
    import geopipe.stages.predict as P
    score = P._predict_table
    def slow(cfg, start, stop):
        time.sleep(float(sys.argv[4]))
        return score(cfg, start, stop)
    P._predict_table = slow
    P.run_predict(P.PredictConfig(checkpoint=sys.argv[1], store=sys.argv[2], out=sys.argv[3], steps=2, device="cpu",
                                  progress=False))
""")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    return {"ckpt": untrained_checkpoint(root / "m"), "store": tiny_store(root / "s.zarr", N)}


def _start(tiny, out, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SLOW, tiny["ckpt"], tiny["store"], str(out), str(pause)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _wait_for(path, proc, what: str) -> None:
    deadline = time.monotonic() + 120
    while not os.path.exists(path) or not open(path).read().strip():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"{what} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize("name,lock", [("ds", "ds/.lock"), ("p.parquet", ".p.parquet.lock")])
def test_a_second_writer_is_refused_in_one_line(tiny, tmp_path, name, lock):
    """Before: a second predict (other settings) into the dataset a first one was writing exited 0 and
    said it predicted every record, while only the first run's parts were there."""
    out = tmp_path / name
    first = _start(tiny, out, 0.3)
    try:
        _wait_for(tmp_path / lock, first, "the first run's lock")
        second = CliRunner().invoke(cli, ["predict", "-c", tiny["ckpt"], "--store", tiny["store"], "-o", str(out), "--steps", "3",
                                          "--device", "cpu"])
        lines = [line for line in second.output.splitlines() if line.strip()]
        assert second.exit_code == 1 and len(lines) == 1, second.output
        assert lines[0] == (f"geopipe: error: {out} is locked by process {first.pid} on {socket.gethostname()} "
                            "(another predict or locate is writing it); wait for it to finish")
        assert first.wait(120) == 0, first.stderr.read().decode()[-2000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    cols, meta = read_predictions(str(out))
    assert len(cols["key"]) == N and meta["config"]["steps"] == 2  # the first run's predictions, whole
    assert not (tmp_path / lock).exists()  # released


def test_a_killed_writer_leaves_no_stale_lock(tiny, tmp_path):
    out = tmp_path / "ds"
    first = _start(tiny, out, 0.5)
    try:
        _wait_for(out / ".lock", first, "the first run's lock")
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    res = run_predict(PredictConfig(checkpoint=tiny["ckpt"], store=tiny["store"], out=str(out), steps=2, device="cpu", progress=False))
    assert res.n_records == N and len(read_predictions(str(out))[0]["key"]) == N

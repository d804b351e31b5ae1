"""`geopipe evaluate -o report.json` killed with SIGKILL while writing: the previous report is
left whole (a real process, a real kill between writing the new report and moving it into place)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, write_predictions
from geopipe.pipeline.core.provenance import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# `geopipe evaluate` whose first fsync (the new report's temporary file, fully written) waits to be killed.
_PAUSED = r"""
import os, sys, time
marker = sys.argv[1]

def fsync(fd):
    open(marker, "w").close()
    time.sleep(600)

os.fsync = fsync
from geopipe.flows.cli import main
sys.argv = ["geopipe", *sys.argv[2:]]
main()
"""


def _predictions(path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    n = 40
    cols = {"key": [f"k{i}" for i in range(n)], "lat": rng.uniform(-60, 60, n), "lon": rng.uniform(-170, 170, n),
            "true_lat": rng.uniform(-60, 60, n), "true_lon": rng.uniform(-170, 170, n)}
    write_predictions(predictions_table(cols, n), str(path), predictions_metadata({}, {"method": {"name": "rfm"}}, provenance()))
    return str(path)


def test_sigkill_while_writing_the_report_keeps_the_previous_one(tmp_path):
    report = tmp_path / "report.json"
    first = _predictions(tmp_path / "a.parquet", 0)
    res = CliRunner().invoke(cli, ["evaluate", first, "-o", str(report)])
    assert res.exit_code == 0, res.output
    before = report.read_bytes()
    second, marker = _predictions(tmp_path / "b.parquet", 1), tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED, str(marker), "evaluate", second, "-o", str(report), "--overwrite"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "evaluate never reached the report write"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert report.read_bytes() == before  # the old report, whole
    assert json.loads(before)["reports"][0]["path"] == first
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.json.")]
    assert leftovers and json.loads((tmp_path / leftovers[0]).read_text())["reports"][0]["path"] == second  # the new one, unfinished

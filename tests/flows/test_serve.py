"""geopipe serve on a fresh machine produces real scheduled flow runs (it starts a Prefect server
with its scheduler), and stops that server when it stops."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.rerun import STATE_FILE


def _toml(demo_stores, work) -> str:
    return f"""workdir = "{work}"
[train]
store = "{demo_stores['train']}"
out = "{work}/model"
dim = 16
depth = 1
steps = 4
batch_size = 32
warmup = 1
val_every = 4
device = "cpu"
progress = false
[predict]
checkpoint = "{work}/model"
store = "{demo_stores['test']}"
out = "{work}/p.parquet"
steps = 2
device = "cpu"
progress = false
[evaluate]
predictions = ["{work}/p.parquet"]
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is not alive
        return fh.read().split()[2] != "Z"


def test_serve_produces_a_real_scheduled_run(demo_stores, tmp_path):
    work = tmp_path / "work"
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(_toml(demo_stores, work))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # a fresh machine: empty Prefect database
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "geopipe", "serve", str(cfg), "--interval", "15"], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while not (work / STATE_FILE).exists():  # written by a successful flow run
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "no scheduled run finished:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(1)
        assert (work / "p.parquet").exists()
    finally:
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = (tmp_path / "serve.log").read_text()
    server_pid = int(re.search(r"started a Prefect server with its scheduler at \S+ \(pid (\d+)", text).group(1))
    deadline = time.monotonic() + 30
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(server_pid), "the Prefect server outlived geopipe serve"
    assert "geopipe serve: stopped" in text
    # on stop, the runs the scheduler had queued ahead are deleted and the deployment paused
    assert re.search(r"geopipe serve: removed \d+ scheduled run\(s\) and paused deployment geopipe-pipeline", text), text


def test_serve_refuses_an_api_url_that_does_not_answer(monkeypatch):
    from geopipe.flows.serve import scheduling_api

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    with pytest.raises(GeopipeError, match="no scheduled run can happen"):
        with scheduling_api(print):
            pass

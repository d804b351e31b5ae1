"""A killed `geopipe extract` takes its forkserver, decode workers and resource tracker along:
real processes, real SIGKILL / SIGTERM of the extract, nothing of its session left seconds later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from procs import session_pids, store_rows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; parent-death signals are Linux-only")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "term"])
def test_killed_extract_leaves_no_process_behind(demo_world, tmp_path, sig):
    store = tmp_path / "k.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "geopipe", "extract", demo_world["train"], "--store", str(store),
                             "--workers", "2", "--batch-size", "8"], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(session_pids(proc.pid)) < 5:  # extract, resource tracker, forkserver, two decode workers
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "extract never got going"
            time.sleep(0.02)
        assert store_rows(store) < 400  # still extracting
        os.kill(proc.pid, sig)  # the extract only: its children must follow by themselves
        proc.wait(30)
        deadline = time.monotonic() + 5
        while session_pids(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:80] for pid in session_pids(proc.pid)}
        assert left == {}, "processes of the killed extract survived it"
    finally:
        for pid in session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)

"""A killed `geopipe extract` takes its forkserver, decode workers and resource tracker along:
real processes, real SIGKILL / SIGTERM of the extract, nothing of its session left seconds later."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _session(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``, from /proc."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(name))
    return pids


def _rows(store) -> int:
    """Committed rows of the store (-1 before it exists)."""
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["rows"]
    except (OSError, ValueError, KeyError):
        return -1


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
        while len(_session(proc.pid)) < 5:  # extract, resource tracker, forkserver, two decode workers
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "extract never got going"
            time.sleep(0.02)
        assert _rows(store) < 400  # still extracting
        os.kill(proc.pid, sig)  # the extract only: its children must follow by themselves
        proc.wait(30)
        deadline = time.monotonic() + 5
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = {pid: open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:80] for pid in _session(proc.pid)}
        assert left == {}, "processes of the killed extract survived it"
    finally:
        for pid in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)

"""geopipe bench --what gpu: its CPU dry run (--device cpu --tiny) runs every check's code path and
agrees with itself; verdicts, the table, the time budget and a failing check's row."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import pytest

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.stages import bench_gpu
from geopipe.stages.bench_gpu_spec import GPU_CHECKS, GpuBenchConfig, format_gpu_table, gpu_check_row

#: The CI budget of the whole dry run (interpreter start and imports included).
DRY_RUN_LIMIT_S = 60.0


def test_dry_run_cli_covers_every_check(tmp_path):
    out = tmp_path / "gpu.json"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geopipe", "bench", "--what", "gpu", "--device", "cpu", "--tiny", "--threads", "1",
                           "--workdir", str(tmp_path / "work"), "-o", str(out)], capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {r["check"] for r in rows} == set(GPU_CHECKS)
    assert not [r for r in rows if r["verdict"] in ("error", "mismatch")], rows
    compared = [r for r in rows if r["verdict"] != "skipped"]
    assert all(r["agreement"] and r["measured"] is not None for r in compared), compared
    assert all(r["verdict"] == "skipped" and "faiss" in r["what"] for r in rows if r not in compared)
    assert doc["environment"]["device"] == "cpu" and doc["tiny"] is True
    assert (tmp_path / "gpu.txt").read_text().splitlines()[0].split()[:3] == ["check", "what", "measured"]
    assert "CPU agreement" in proc.stdout and f"{len(rows)} rows" in proc.stdout
    load = os.getloadavg()[0]
    print(f"dry run: {wall:.1f} s wall, {cpu:.1f} CPU-s, {doc['seconds']} s in the checks, load {load:.1f}")
    # On a machine busy with other work (load above twice its cores) the wall clock measures the
    # others; the dry run's own CPU seconds (its Dask workers included) must then fit the limit.
    spent, what = (cpu, "CPU-s") if load > 2 * (os.cpu_count() or 1) else (wall, "s wall")
    assert spent < DRY_RUN_LIMIT_S, f"the dry run took {spent:.1f} {what} (limit {DRY_RUN_LIMIT_S:g}): " + json.dumps(
        {r["check"]: r["details"].get("check_seconds") for r in rows})


def test_verdicts_and_table():
    assert gpu_check_row("x", "a", measured=2, baseline=1, ratio=2, at_least=0.9, agreed=True).verdict == "pass"
    assert gpu_check_row("x", "a", measured=1, baseline=2, ratio=0.5, at_least=0.9, agreed=True).verdict == "below target"
    assert gpu_check_row("x", "a", ratio=6, at_most=5).verdict == "below target"
    assert gpu_check_row("x", "a", ratio=2, at_least=0.9, agreed=False).verdict == "mismatch"
    assert gpu_check_row("x", "a", measured=3.0).verdict == "info"
    row = gpu_check_row("nll", "exact NLL", unit="records/s", measured=1234.5, baseline=10, ratio=3.8, at_most=5, agreed=True,
                        agreement="max |dNLL| 1e-6")
    lines = format_gpu_table([row]).splitlines()
    assert len(lines) == 3 and "1,234 records/s" in lines[2] and "≤ 5" in lines[2] and lines[2].rstrip().endswith("pass")


def test_budget_skips_and_a_raising_check_is_one_error_row(tmp_path, monkeypatch):
    def boom(cfg, device):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(bench_gpu, "_check_functions", lambda: {name: boom for name in GPU_CHECKS})
    res = bench_gpu.run_gpu_bench(GpuBenchConfig(device="cpu", tiny=True, workdir=str(tmp_path), out=str(tmp_path / "g.json"),
                                                 checks=("stream", "nll")))
    assert [(r.check, r.verdict) for r in res.rows] == [("stream", "error"), ("nll", "error")] and not res.ok
    assert "no kernel image" in res.rows[0].details["error"]
    assert json.loads((tmp_path / "g.json").read_text())["rows"][1]["verdict"] == "error"
    res = bench_gpu.run_gpu_bench(GpuBenchConfig(device="cpu", tiny=True, workdir=str(tmp_path), budget_s=1e-9, checks=("train",)))
    assert [r.verdict for r in res.rows] == ["skipped"] and res.ok


def test_options_are_checked():
    with pytest.raises(ConfigError, match="unknown gpu check"):
        GpuBenchConfig(checks=("warp",))
    with pytest.raises(GeopipeError, match="--device cpu --tiny"):
        bench_gpu.run_gpu_bench(GpuBenchConfig(device="cpu", tiny=False))

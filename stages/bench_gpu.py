"""``geopipe bench --what gpu``: every CUDA path timed against its bare baseline in one run, each
result checked against the CPU path on a small batch.

One prepared run for a GPU machine that is lent for minutes: seven checks, in this order,

* ``extract``   — extract loop (decode workers, autocast encode, store commits) vs bare encode;
* ``stream``    — training fed by ``StoreStream`` (pinned memory, non-blocking copies) vs tensors on the device;
* ``train``     — the 512×12 training loop (LAMB, EMA, NaN guard, clipping) vs a bare step loop;
* ``sample``    — 16-step guided sampling vs a bare loop of the same forwards;
* ``nll``       — exact likelihood: cost of one ODE evaluation in forwards;
* ``retrieval`` — top-k: the torch backend (CPU), a bare GPU matmul + top-k, faiss on the GPU when present;
* ``dask``      — ``--dask local:N``: which device each worker resolves, extract on local:N vs one process.

Each check gives rows (:class:`GpuCheck`): what was measured, its bare baseline, the ratio,
the target, and an agreement with the CPU path on a small batch within a stated tolerance. A
check that raises is one ``error`` row (the others still run); a check started after
``budget_s`` is ``skipped``. The JSON is rewritten after every check, so a run cut short keeps
what it measured. ``tiny=True`` (with ``device="cpu"``: the CI dry run) runs the same code paths
at toy sizes in well under a minute.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.fsio import write_atomic
from geopipe.stages.bench_gpu_spec import GPU_CHECKS, GpuBenchConfig, GpuCheck, format_gpu_table

__all__ = ["GpuBenchResult", "run_gpu_bench"]

@dataclass(frozen=True)
class GpuBenchResult:
    """rows: every check's rows; ok: no error or mismatch (targets missed are findings, not failures)."""

    rows: tuple[GpuCheck, ...]
    seconds: float
    device: str
    json_path: str | None = None
    table_path: str | None = None

    @property
    def ok(self) -> bool:
        return not any(r.verdict in ("error", "mismatch") for r in self.rows)


def _environment(device) -> dict:
    import platform

    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(), "device": str(device),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return env


def _check_functions() -> dict[str, Callable]:
    from geopipe.stages import bench_gpu_data as data
    from geopipe.stages import bench_gpu_model as model

    return {"extract": data.check_extract, "stream": model.check_stream, "train": model.check_train, "sample": model.check_sample,
            "nll": model.check_nll, "retrieval": data.check_retrieval, "dask": data.check_dask}


def _write(cfg: GpuBenchConfig, rows: list, env: dict, seconds: float) -> tuple[str | None, str | None]:
    if not cfg.out:
        return None, None
    doc = {"benchmark": "geopipe bench --what gpu", "tiny": cfg.tiny, "budget_s": cfg.budget_s, "seconds": round(seconds, 1),
           "environment": env, "sizes": asdict(cfg.sizes), "rows": [asdict(r) for r in rows]}
    table = os.path.splitext(cfg.out)[0] + ".txt"
    write_atomic(cfg.out, json.dumps(doc, indent=2, default=str).encode())
    write_atomic(table, (format_gpu_table(rows) + "\n").encode())
    return cfg.out, table


def run_gpu_bench(cfg: GpuBenchConfig, on_row: Callable[[GpuCheck], None] | None = None) -> GpuBenchResult:
    """Run the checks of ``cfg`` (see the module docstring); ``on_row`` sees each row as it comes."""
    import torch

    from geopipe.pipeline.core.device import resolve_device, set_cpu_threads

    device = resolve_device(cfg.device)
    if device.type != "cuda" and not cfg.tiny:
        raise GeopipeError(f"bench --what gpu needs a CUDA device (got {device}); on a machine without one run the dry run: "
                           "geopipe bench --what gpu --device cpu --tiny")
    if cfg.threads:
        set_cpu_threads(cfg.threads)
    os.makedirs(cfg.workdir, exist_ok=True)
    t0, rows, env = time.perf_counter(), [], _environment(device)
    functions = _check_functions()
    for name in (c for c in GPU_CHECKS if c in cfg.checks):
        if time.perf_counter() - t0 > cfg.budget_s:
            new = [GpuCheck(name, "not started", verdict="skipped", details={"reason": f"past the {cfg.budget_s:g} s budget"})]
        else:
            started = time.perf_counter()
            try:
                new = list(functions[name](cfg, device))
            except Exception as exc:  # noqa: BLE001 — one check's failure must not cost the others
                new = [GpuCheck(name, "check raised", verdict="error", details={"error": f"{type(exc).__name__}: {exc}"[:500]})]
            new = [replace(r, details={**r.details, "check_seconds": round(time.perf_counter() - started, 2)}) for r in new]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.extend(new)
        for r in new:
            if on_row:
                on_row(r)
        _write(cfg, rows, env, time.perf_counter() - t0)
    seconds = time.perf_counter() - t0
    json_path, table_path = _write(cfg, rows, env, seconds)
    return GpuBenchResult(tuple(rows), seconds, str(device), json_path, table_path)

"""The vocabulary of ``geopipe bench --what gpu`` (:mod:`geopipe.stages.bench_gpu`): workloads,
options, one report row with its verdict, the human table, and best-of timing with CUDA
synchronisation, shared by the check modules (``bench_gpu_model``, ``bench_gpu_data``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

from geopipe.pipeline.core.errors import ConfigError

__all__ = ["GPU_CHECKS", "GpuBenchSizes", "TINY", "GpuBenchConfig", "GpuCheck", "gpu_check_row", "format_gpu_table", "sync",
           "best_time"]

#: The checks, in the order they run.
GPU_CHECKS = ("extract", "stream", "train", "sample", "nll", "retrieval", "dask")


@dataclass(frozen=True)
class GpuBenchSizes:
    """Workloads of the checks (defaults: the full run, about 4–6 minutes on one H100)."""

    backbone: str = "ViT-B-32"  # random init (pretrained="random"): no download
    pretrained: str | None = "random"
    precision: str = "auto"  # bf16 autocast on CUDA
    images: int = 2048
    image_px: int = 256
    image_batch: int = 256
    shards: int = 8
    decode_workers: int = 8
    net_dim: int = 512
    net_depth: int = 12
    cond_dim: int = 512
    train_batch: int = 1024
    train_steps: int = 100
    stream_rows: int = 262_144
    chunk_rows: int = 4096
    sample_batch: int = 4096
    sample_steps: int = 16
    nll_batch: int = 512
    repeats: int = 2
    db_rows: int = 1_000_000
    db_dim: int = 512
    queries: int = 4096
    k: int = 10
    dask_workers: int = 2
    dask_images: int = 512
    agree: int = 16  # records (images, points, queries) of each CPU comparison


#: The CI dry run's sizes: the same code paths, toy workloads (tiny random backbone, bf16
#: autocast on CPU so the autocast branch runs).
TINY = GpuBenchSizes(backbone="tiny", pretrained=None, precision="bf16", images=32, image_px=64, image_batch=16, shards=2,
                     decode_workers=0, net_dim=32, net_depth=2, cond_dim=64, train_batch=64, train_steps=4, stream_rows=4096,
                     chunk_rows=512, sample_batch=64, nll_batch=16, repeats=1, db_rows=20_000, db_dim=64, queries=200,
                     dask_workers=2, dask_images=4, agree=8)


@dataclass(frozen=True)
class GpuBenchConfig:
    """device: where the CUDA paths run ("cuda", "cuda:N"; "cpu" only for the dry run);
    workdir: synthetic inputs (shards, stores; reused); out: the JSON (the table goes beside it
    as .txt); budget_s: checks not started by then are skipped; checks: a subset of GPU_CHECKS."""

    device: str = "cuda"
    tiny: bool = False
    workdir: str = "bench-data"
    out: str | None = None
    budget_s: float = 420.0
    threads: int | None = None
    checks: tuple[str, ...] = GPU_CHECKS
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.checks) - set(GPU_CHECKS))
        if unknown:
            raise ConfigError(f"unknown gpu check(s) {unknown}; choose from {list(GPU_CHECKS)}")
        if not self.budget_s > 0:
            raise ConfigError(f"budget_s must be > 0, got {self.budget_s!r}")

    @property
    def sizes(self) -> GpuBenchSizes:
        if not self.tiny:
            return replace(GpuBenchSizes(), decode_workers=max(1, min(8, (os.cpu_count() or 2) - 2)))
        return TINY


@dataclass(frozen=True)
class GpuCheck:
    """One row of the report. measured/baseline in ``unit``; ratio = measured / baseline for
    rates (≥ target is good) or the cost ratio named in ``target``; agreement: the CPU comparison
    and its tolerance; verdict: pass | below target | mismatch | error | skipped | info."""

    check: str
    what: str
    unit: str = ""
    measured: float | None = None
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    agreement: str = ""
    verdict: str = "info"
    details: dict = field(default_factory=dict)


def gpu_check_row(check: str, what: str, *, unit: str = "", measured=None, baseline=None, ratio=None, at_least: float | None = None,
                  at_most: float | None = None, agreed: bool | None = None, agreement: str = "", details: dict | None = None) -> GpuCheck:
    """A row with its verdict: ``mismatch`` when the CPU comparison failed, else ``below target``
    when the ratio misses ``at_least``/``at_most``, else ``pass`` (``info`` without target and comparison)."""
    ratio = None if ratio is None else float(ratio)
    target = f"≥ {at_least:g}" if at_least is not None else f"≤ {at_most:g}" if at_most is not None else ""
    if agreed is False:
        verdict = "mismatch"
    elif ratio is not None and ((at_least is not None and ratio < at_least) or (at_most is not None and ratio > at_most)):
        verdict = "below target"
    elif target or agreed:
        verdict = "pass"
    else:
        verdict = "info"
    num = lambda v: None if v is None else float(v)  # noqa: E731
    return GpuCheck(check, what, unit, num(measured), num(baseline), ratio, target, agreement, verdict, dict(details or {}))


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def format_gpu_table(rows) -> str:
    """The human table: check, what, measured, baseline, ratio, target, agreement, verdict."""
    head = ("check", "what", "measured", "baseline", "ratio", "target", "CPU agreement", "verdict")
    body = [(r.check, r.what, f"{_fmt(r.measured)} {r.unit}".strip(), _fmt(r.baseline), _fmt(r.ratio), r.target or "-",
             r.agreement or "-", r.verdict) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock times are real."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def best_time(fn, repeats: int, device) -> float:
    """Fastest of ``repeats`` timed calls of ``fn()`` (seconds, synchronised before and after)."""
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)

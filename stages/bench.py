"""Benchmarks reported as ratios against a bare baseline measured in the same run.

* ``bench_predict``: guided Riemannian sampling (records/s) vs a bare loop of the same
  network's forward passes (2 × steps per record: one duplicated-batch call per step).
  Ratio = bare time / sampling time; ≥ 0.9 means sampling adds no overhead.
* ``bench_nll``: exact log-likelihood (records/s, function evaluations) and the cost of one
  function evaluation (velocity + batched 3×3 Jacobian) relative to one forward pass of the
  same batch; target ≤ 5×.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.network import NetworkConfig
from geopipe.stages.bench_gpu_spec import best_time, sync

__all__ = ["BenchConfig", "bench_predict", "bench_nll"]


@dataclass(frozen=True)
class BenchConfig:
    """Network and workload of the benchmarks (defaults: the paper's 512×12, batch 4096, 16 steps)."""

    dim: int = 512
    depth: int = 12
    cond_dim: int = 1024
    batch: int = 4096
    steps: int = 16
    nll_batch: int = 512
    repeats: int = 2
    threads: int | None = None
    device: str = "auto"
    seed: int = 0
    progress: bool = True  # network forward passes done / total on stderr

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "cond_dim", "batch", "steps", "nll_batch", "repeats"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"--threads must be a whole number >= 1, got {self.threads!r}")


def _figures(cfg: BenchConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k != "progress"}


def _count_forwards(model, bar: Progress):
    """Make ``model`` count its forward passes on ``bar``; returns the original forward."""
    forward = model.forward

    def counted(*args, **kwargs):
        bar.update(1)
        return forward(*args, **kwargs)

    model.forward = counted
    return forward


def _setup(cfg: BenchConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    method = get_method("rfm")
    model = method.build_model(NetworkConfig(dim=cfg.dim, depth=cfg.depth, cond_dim=cfg.cond_dim)).to(device).eval()
    for p in model.parameters():  # the zero-initialised MLP outputs would make the field trivial
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    cond = torch.randn(cfg.batch, cfg.cond_dim, device=device)
    return method, model, cond, device


def bench_predict(cfg: BenchConfig = BenchConfig()) -> dict:
    """Guided 16-step RFM sampling vs the bare forward loop; returns records/s and the ratio."""
    method, model, cond, device = _setup(cfg)
    y2 = torch.nn.functional.normalize(torch.randn(2 * cfg.batch, 3, device=device), dim=-1)
    c2 = torch.cat([cond, torch.zeros_like(cond)])
    g2 = torch.rand(2 * cfg.batch, device=device)

    @torch.inference_mode()
    def bare():
        for _ in range(cfg.steps):
            model(y2, g2, c2)

    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def sample():
        method.predict_point(model, cond, steps=cfg.steps, guidance=2.0, generator=gen)

    # one guided call per sampling step: warm-up + repeats of sampling, repeats of the bare loop
    with Progress(cfg.steps * (1 + 2 * cfg.repeats), "bench predict", "fwd", enabled=cfg.progress) as bar:
        forward = _count_forwards(model, bar)
        try:
            sample()  # warm-up (allocator, kernels)
            t_bare = best_time(bare, cfg.repeats, device)
            t_sample = best_time(sample, cfg.repeats, device)
        finally:
            model.forward = forward
    return {
        **_figures(cfg),
        "torch_threads": torch.get_num_threads(),
        "device_name": str(device),
        "bare_forward_s": t_bare,
        "sample_s": t_sample,
        "records_per_s": cfg.batch / t_sample,
        "ms_per_record": 1000 * t_sample / cfg.batch,
        "ratio_bare_over_sample": t_bare / t_sample,
    }


def bench_nll(cfg: BenchConfig = BenchConfig()) -> dict:
    """Exact NLL throughput and cost per function evaluation relative to one forward pass."""
    method, model, cond, device = _setup(cfg)
    n = cfg.nll_batch
    x = torch.nn.functional.normalize(torch.randn(n, 3, device=device), dim=-1)
    c = cond[:n]
    forward = model.forward

    @torch.inference_mode()
    def one_forward():
        forward(x, torch.rand(n, device=device), c)

    t_fwd = best_time(one_forward, max(cfg.repeats, 3), device)
    with Progress(None, "bench nll", "eval", enabled=cfg.progress) as bar:  # adaptive solver: no known total
        _count_forwards(model, bar)
        try:
            t0 = time.perf_counter()
            method.log_likelihood(model, x, c, rtol=1e-5, atol=1e-5)
            sync(device)
            t_nll = time.perf_counter() - t0
        finally:
            model.forward = forward
    nfe = max(bar.n, 1)
    return {
        **_figures(cfg),
        "device_name": str(device),
        "nll_s": t_nll,
        "records_per_s": n / t_nll,
        "function_evals": nfe,
        "forward_s": t_fwd,
        "cost_per_eval_over_forward": (t_nll / nfe) / t_fwd,
    }

"""The training step loop, over any batch source.

An explicit loop that reads top to bottom: learning rate from a pure schedule, one objective
evaluation, NaN-guarded gradients, optional clipping, optimiser step, EMA update, periodic
validation with the EMA weights and a ``save`` callback. What feeds it is a *batch source*
(:class:`BatchSource`): today the in-memory :class:`TensorBatches`; a streaming source over the
store plugs in at the same seam.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.train.optim import lr_at, set_lr

__all__ = ["BatchSource", "TensorBatches", "LoopConfig", "LoopState", "LoopJob", "split_is_val", "validate", "ema_model", "run_loop"]


def split_is_val(keys, fraction: float) -> np.ndarray:
    """Deterministic train/validation split by CRC32 of the record key (stable under appends)."""
    buckets = np.fromiter((zlib.crc32(str(k).encode()) % 10_000 for k in keys), dtype=np.int64, count=len(keys))
    return buckets < int(round(fraction * 10_000))


class BatchSource(Protocol):
    """Yields training batches: ``next_batch(generator) -> (x (B, 3) unit, cond (B, C))``.

    The generator is the loop's own seeded generator, so a resumed run draws the same batches.
    """

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class TensorBatches:
    """Batches drawn uniformly with replacement from tensors already in memory (on ``device``)."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor, batch_size: int):
        self.x, self.cond, self.batch_size = x, cond, batch_size

    def __len__(self) -> int:
        return len(self.x)

    def next_batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.x), (self.batch_size,), generator=generator, device=self.x.device)
        return self.x[idx], self.cond[idx]


@dataclass(frozen=True)
class LoopConfig:
    """Step-loop settings: ``lr`` is the peak rate after ``warmup`` steps (cosine decay to
    ``steps``); ``grad_clip`` None disables clipping; validation every ``val_every`` steps on at
    most ``val_batches`` batches of ``batch_size``; ``seed`` seeds the validation noise."""

    steps: int
    lr: float
    warmup: int
    grad_clip: float | None
    batch_size: int
    val_every: int
    val_batches: int
    seed: int


@dataclass
class LoopState:
    """Where a run stands: completed ``step`` and the validation ``history`` so far."""

    step: int = 0
    history: list | None = None
    train_loss: float = float("nan")
    val_loss: float = float("nan")


@torch.no_grad()
def validate(method, model, x, c, cfg: LoopConfig, condition) -> float:
    """Mean objective over the first ``val_batches`` batches of (x, c); NaN when empty.
    ``condition`` maps raw embeddings to the network's conditioning (standardisation)."""
    if len(x) == 0:
        return float("nan")
    g = torch.Generator(device=x.device).manual_seed(cfg.seed)
    losses = []
    for i in range(0, min(len(x), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        losses.append(float(method.loss(model, x[i : i + cfg.batch_size], condition(c[i : i + cfg.batch_size]), generator=g)))
    return float(np.mean(losses))


def ema_model(model, ema):
    """A copy of ``model`` carrying the EMA weights (for validation)."""
    shadow = copy.deepcopy(model)
    ema.copy_to(shadow)
    return shadow.eval()


@dataclass(frozen=True, eq=False)
class LoopJob:
    """One training run for :func:`run_loop`: the ``method``'s objective trains ``model`` with
    ``optimizer`` (None: nothing to train, e.g. the uniform baseline) and updates ``ema``;
    batches come from ``batches`` and are drawn with ``generator`` (seeded: a resumed run
    draws the same batches); ``val`` = (x (m, 3) unit, raw embeddings (m, D)) is scored with
    the EMA weights; ``condition`` maps raw embeddings to the network's conditioning
    (standardisation); ``save(state)`` writes a checkpoint; ``desc``/``progress``: the progress bar."""

    method: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    ema: object
    batches: BatchSource
    val: tuple
    condition: Callable[[torch.Tensor], torch.Tensor]
    config: LoopConfig
    generator: torch.Generator
    save: Callable[[LoopState], None]
    desc: str = "train"
    progress: bool = True


def run_loop(job: LoopJob, state: LoopState) -> LoopState:
    """Train from ``state.step`` to ``job.config.steps``; validate and ``job.save(state)`` every
    ``val_every`` steps and at the end. Five consecutive non-finite losses stop the run."""
    cfg, model, optimizer = job.config, job.model, job.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    history = state.history if state.history is not None else []
    state.history = history
    x_va, c_va = job.val
    bad = 0
    bar = Progress(cfg.steps, job.desc, "step", initial=state.step, enabled=job.progress)
    model.train()
    while optimizer is not None and state.step < cfg.steps:
        set_lr(optimizer, lr_at(state.step, lr0=cfg.lr, warmup=cfg.warmup, total=cfg.steps))
        x, c = job.batches.next_batch(job.generator)
        loss = job.method.loss(model, x, job.condition(c), generator=job.generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            bad += 1
            if bad >= 5:
                raise GeopipeError(f"training diverged: 5 consecutive non-finite losses at step {state.step}; lower --lr")
        else:
            bad = 0
        for p in params:  # NaN guard: non-finite gradients are zeroed rather than poisoning the weights
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        job.ema.update(model)
        state.step += 1
        value = loss.item()
        state.train_loss = 0.98 * state.train_loss + 0.02 * value if math.isfinite(state.train_loss) else value
        bar.update(1)
        if state.step % cfg.val_every == 0 or state.step == cfg.steps:
            state.val_loss = validate(job.method, ema_model(model, job.ema), x_va, c_va, cfg, job.condition)
            history.append({"step": state.step, "train_loss": state.train_loss, "val_loss": state.val_loss})
            bar.set_postfix(loss=f"{state.train_loss:.4f}", val=f"{state.val_loss:.4f}")
            job.save(state)
    bar.close()
    if history and history[-1]["step"] == state.step:  # finished here, or resumed a finished run
        state.train_loss, state.val_loss = history[-1]["train_loss"], history[-1]["val_loss"]
    else:  # parameter-free method (uniform): nothing to optimise, checkpoint it as is
        state.val_loss = validate(job.method, ema_model(model, job.ema), x_va, c_va, cfg, job.condition)
        job.save(state)
    model.train(False)
    return state

"""Train stage: a generative geolocation model on a store's cached embeddings.

An explicit loop that reads top to bottom: LAMB (or AdamW) with warm-up + cosine decay,
real EMA (A2), conditioning dropout inside the objective, periodic validation with the EMA
weights, atomic checkpoints {EMA weights, raw weights + optimiser, step, RNG, config}, and
resume that continues bit-identically where an interrupted run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.checkpoint import (
    load_checkpoint_config,
    load_model_weights,
    load_train_state,
    pack_train_state,
    restore_train_state,
    save_checkpoint,
)
from pipeline.conditioning import CondStats
from pipeline.device import resolve_device
from pipeline.errors import GeopipeError
from pipeline.geometry import latlon_to_xyz
from pipeline.network import NetworkConfig
from pipeline.objectives import get_method
from pipeline.optim import EMA, lr_at, make_optimizer, set_lr
from pipeline.provenance import provenance
from pipeline.store import read_store
from schemas.checkpoint import CHECKPOINT_SCHEMA, CONFIG_FILE

__all__ = ["TrainConfig", "TrainResult", "run_train", "split_is_val"]

_VMF_METHODS = ("vmf", "vmf_mixture")


@dataclass(frozen=True)
class TrainConfig:
    """Training options; ``depth=None`` means the method's default (12, or 11 for vMF heads, §4.3)."""

    store: str
    out: str
    method: str = "rfm"
    dim: int = 512
    depth: int | None = None
    expansion: int = 4
    schedule: str = "sigmoid"
    schedule_params: dict = field(default_factory=dict)
    cond_drop: float | None = None  # None: 0.1 for generative methods, 0 for vMF baselines (§11)
    steps: int = 20000
    batch_size: int = 1024
    lr: float | None = None  # None: 8e-4 generative, 1e-4 vMF (§10)
    warmup: int = 500
    weight_decay: float = 0.05
    optimizer: str = "lamb"
    ema_decay: float = 0.999
    grad_clip: float | None = None  # None: none for generative, 0.05 for vMF (§10)
    standardize_cond: bool = True  # per-dimension z-scores of the embeddings (pipeline.conditioning)
    val_fraction: float = 0.05
    val_every: int = 1000
    val_batches: int = 4
    seed: int = 3407
    resume: bool = True
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.val_every < 1:
            raise ValueError("steps, batch_size and val_every must be positive")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps}); pass a smaller --warmup")
        if (self.cond_drop is not None and not 0 <= self.cond_drop < 1) or not 0 <= self.val_fraction < 1:
            raise ValueError("cond_drop and val_fraction must lie in [0, 1)")


@dataclass(frozen=True)
class TrainResult:
    checkpoint: str
    method: str
    step: int
    train_loss: float
    val_loss: float
    n_train: int
    n_val: int
    seconds: float
    history: tuple = ()


def split_is_val(keys, fraction: float) -> np.ndarray:
    """Deterministic train/validation split by CRC32 of the record key (stable under appends)."""
    buckets = np.fromiter((zlib.crc32(str(k).encode()) % 10_000 for k in keys), dtype=np.int64, count=len(keys))
    return buckets < int(round(fraction * 10_000))


def _fingerprint(store) -> str:
    shards = json.dumps(store.attrs.get("shards", {}), sort_keys=True, default=str)
    return hashlib.sha256(f"{len(store.keys)}|{shards}".encode()).hexdigest()[:16]


def _model_config(cfg: TrainConfig, store, method, net_cfg, stats: CondStats) -> dict:
    return {
        "condition": stats.to_dict(),
        "schema": CHECKPOINT_SCHEMA,
        "method": method.to_dict(),
        "network": net_cfg.to_dict(),
        "embed_dim": int(store.embeddings.shape[1]),
        "normalized": bool(store.attrs.get("normalized", True)),
        "backbone": store.attrs.get("backbone", {}),
        "data_fingerprint": _fingerprint(store),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "device")},
        **provenance(),
    }


def _resume(cfg, model, optimizer, ema, generator) -> tuple[int, list]:
    """Continue from ``cfg.out`` when it holds a training state of the same method."""
    if not os.path.exists(os.path.join(cfg.out, CONFIG_FILE)):
        return 0, []
    saved = load_checkpoint_config(cfg.out)
    if saved["method"]["name"] != cfg.method:
        raise GeopipeError(f"{cfg.out} holds a {saved['method']['name']!r} run; use --no-resume or another --out")
    packed = load_train_state(cfg.out)
    if packed is None:
        return 0, []
    tensors, meta = packed
    restore_train_state(model, optimizer, tensors, meta)
    ema.load_state_dict(load_model_weights(cfg.out))
    generator.set_state(tensors["rng"])
    return int(meta["step"]), list(meta.get("history", []))


@torch.no_grad()
def _validate(method, model, x, c, cfg, stats: CondStats) -> float:
    if len(x) == 0:
        return float("nan")
    g = torch.Generator(device=x.device).manual_seed(cfg.seed)
    losses = []
    for i in range(0, min(len(x), cfg.val_batches * cfg.batch_size), cfg.batch_size):
        losses.append(float(method.loss(model, x[i : i + cfg.batch_size], stats.apply(c[i : i + cfg.batch_size]), generator=g)))
    return float(np.mean(losses))


def _save(cfg, model, optimizer, ema, generator, config, step, history):
    train_state, train_meta = (None, None)
    if optimizer is not None:
        train_state, train_meta = pack_train_state(model, optimizer, step=step, history=history)
        train_state["rng"] = generator.get_state()
    save_checkpoint(cfg.out, model_state=ema.state_dict(), config={**config, "step": step},
                    train_state=train_state, train_meta=train_meta)


def _ema_model(model, ema):
    """A copy of ``model`` carrying the EMA weights (for validation)."""
    import copy

    shadow = copy.deepcopy(model)
    ema.copy_to(shadow)
    return shadow.eval()


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.store`` and write the checkpoint directory ``cfg.out``."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    store = read_store(cfg.store)
    is_val = split_is_val(store.keys, cfg.val_fraction)
    x_all = latlon_to_xyz(torch.as_tensor(store.latlon, dtype=torch.float64)).float()
    c_all = torch.as_tensor(store.embeddings)  # kept in the store's dtype (float16 halves memory)
    x_tr, c_tr = x_all[~is_val].to(device), c_all[~is_val].to(device)
    x_va, c_va = x_all[is_val].to(device), c_all[is_val].to(device)
    if len(x_tr) == 0:
        raise GeopipeError(f"store {cfg.store} has no training records")

    c_np = store.embeddings[~is_val]
    stats = CondStats.from_embeddings(c_np) if cfg.standardize_cond else CondStats.identity(c_all.shape[1])
    vmf = cfg.method in _VMF_METHODS
    method = get_method(cfg.method, schedule=cfg.schedule, schedule_params=dict(cfg.schedule_params), cond_drop=cfg.cond_drop)
    depth = cfg.depth if cfg.depth is not None else (11 if vmf else 12)
    net_cfg = NetworkConfig(input_dim=3, dim=cfg.dim, depth=depth, expansion=cfg.expansion, cond_dim=c_all.shape[1])
    torch.manual_seed(cfg.seed)
    model = method.build_model(net_cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr0 = cfg.lr if cfg.lr is not None else (1e-4 if vmf else 8e-4)
    clip = cfg.grad_clip if cfg.grad_clip is not None else (0.05 if vmf else None)
    optimizer = make_optimizer(cfg.optimizer, params, lr=lr0, weight_decay=cfg.weight_decay) if params else None
    ema = EMA(model, decay=cfg.ema_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    config = _model_config(cfg, store, method, net_cfg, stats)
    step, history = _resume(cfg, model, optimizer, ema, generator) if cfg.resume and optimizer else (0, [])
    train_loss, val_loss, bad = float("nan"), float("nan"), 0

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.method}", unit="step", file=sys.stderr, disable=not cfg.progress)
    model.train()
    while optimizer and step < cfg.steps:
        set_lr(optimizer, lr_at(step, lr0=lr0, warmup=cfg.warmup, total=cfg.steps))
        idx = torch.randint(len(x_tr), (cfg.batch_size,), generator=generator, device=device)
        loss = method.loss(model, x_tr[idx], stats.apply(c_tr[idx]), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not torch.isfinite(loss):
            bad += 1
            if bad >= 5:
                raise GeopipeError(f"training diverged: 5 consecutive non-finite losses at step {step}; lower --lr")
        else:
            bad = 0
        for p in params:  # NaN guard (§10): non-finite gradients are zeroed
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        ema.update(model)
        step += 1
        loss_value = loss.item()
        train_loss = 0.98 * train_loss + 0.02 * loss_value if math.isfinite(train_loss) else loss_value
        bar.update(1)
        if step % cfg.val_every == 0 or step == cfg.steps:
            val_loss = _validate(method, _ema_model(model, ema), x_va, c_va, cfg, stats)
            history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss})
            bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
            _save(cfg, model, optimizer, ema, generator, config, step, history)
    bar.close()
    if history and history[-1]["step"] == step:  # finished here, or resumed a finished run
        train_loss, val_loss = history[-1]["train_loss"], history[-1]["val_loss"]
    else:  # parameter-free method (uniform): nothing to optimise, checkpoint it as is
        val_loss = _validate(method, _ema_model(model, ema), x_va, c_va, cfg, stats)
        _save(cfg, model, optimizer, ema, generator, config, step, history)
    model.train(False)
    return TrainResult(cfg.out, cfg.method, step, train_loss, val_loss, int(len(x_tr)), int(len(x_va)), time.perf_counter() - t0, tuple(history))

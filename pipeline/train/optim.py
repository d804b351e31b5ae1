"""Optimisation pieces of the training loop (docs/methods.md#training): LR schedule, optimisers, EMA.

* :func:`lr_at` — linear warm-up from exactly 0, then half-cosine decay to 0 at ``total``.
* :func:`make_optimizer` — ``"lamb"`` (timm's Lamb, configured to the documented semantics) or ``"adamw"``.
* :class:`EMA` — a real exponential moving average ``ema ← decay·ema + (1 − decay)·θ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from geopipe.pipeline.core.errors import ConfigError

__all__ = ["OPTIMIZERS", "lr_at", "make_optimizer", "set_lr", "EMA"]


def lr_at(step: int, *, lr0: float, warmup: int = 500, total: int) -> float:
    """Learning rate at global optimisation step ``step``.

    ``lr0·step/warmup`` for ``step < warmup`` (so lr(0) = 0), else
    ``lr0·½(1 + cos(π (step − warmup)/(total − warmup)))``; held at 0 after ``total``.
    """
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if warmup < 0 or total <= warmup:
        raise ConfigError(f"lr_at: need 0 <= warmup < total, got warmup={warmup}, total={total}")
    if lr0 < 0:
        raise ValueError(f"lr_at: lr0 must be >= 0, got {lr0}")
    if step < warmup:
        return lr0 * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return lr0 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _make_lamb(params: Iterable, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """LAMB as documented (a kept implementation, timm's, rather than a hand-written one).

    Per tensor θ with gradient g at step k: Adam moments m, v with bias correction,
    r = m̂/(sqrt(v̂) + eps) + wd·θ, trust = ||θ||/||r|| (1 if either norm is 0),
    θ ← θ − lr·trust·r. timm options that would deviate are switched off: no global gradient
    clipping (``max_grad_norm=None``), no trust clipping, trust ratio on every tensor even at
    wd = 0 (``always_adapt``), coupled (L2-in-update) weight decay.
    """
    from timm.optim import Lamb  # heavy import (timm), needed only here

    return Lamb(
        params,
        lr=lr,
        bias_correction=True,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        grad_averaging=True,
        max_grad_norm=None,
        trust_clip=False,
        always_adapt=True,
    )  # caution / decoupled_decay stay at their False defaults (absent in older timm releases)


def _make_adamw(params: Iterable, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """torch's AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


#: name -> factory(params, lr, weight_decay, betas, eps)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _make_adamw, "lamb": _make_lamb}


def make_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Build optimiser ``name`` ("lamb" or "adamw"; the defaults lr 8e-4, wd 0.05 are the caller's)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    if lr < 0 or weight_decay < 0 or eps <= 0:
        raise ConfigError(f"optimizer {name!r}: need lr >= 0, weight_decay >= 0, eps > 0; got {lr}, {weight_decay}, {eps}")
    b1, b2 = (float(b) for b in betas)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ConfigError(f"optimizer {name!r}: betas must lie in [0, 1), got {tuple(betas)}")
    return OPTIMIZERS[name](params, float(lr), float(weight_decay), (b1, b2), float(eps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (called each step with :func:`lr_at`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class EMA:
    """Exponential moving average of a module's weights: ``ema ← decay·ema + (1 − decay)·θ``.

    Starts as a copy of the module's state. Floating-point parameters with ``requires_grad`` are
    averaged; everything else in the state dict (buffers, frozen parameters) is copied as is, so
    :meth:`state_dict` is a complete state dict of the module (what checkpoints export).
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self._averaged = {n for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()}
        # averaged weights are copies; everything else shares the module's tensor (a hybrid's gallery
        # buffers are the size of the training store: copying them every step would cost a store's bytes)
        self._shadow: dict[str, Tensor] = {k: v.detach().clone() if k in self._averaged else v.detach()
                                           for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights into the average (call after every optimiser step)."""
        state = module.state_dict()
        self._check_keys(state.keys(), "module")
        for k, v in state.items():
            shadow = self._shadow[k]
            if k in self._averaged:
                shadow.mul_(self.decay).add_(v.detach().to(shadow.dtype), alpha=1.0 - self.decay)
            elif shadow.data_ptr() != v.data_ptr():
                shadow.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged weights, keyed like ``module.state_dict()`` (shared, not copied)."""
        return dict(self._shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Replace the averaged weights (e.g. from a checkpoint's model.safetensors)."""
        self._check_keys(state.keys(), "state dict")
        for k, v in state.items():
            if v.shape != self._shadow[k].shape:
                raise ValueError(f"EMA state {k!r} has shape {tuple(v.shape)}, expected {tuple(self._shadow[k].shape)}")
            self._shadow[k].copy_(v)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into ``module`` (for sampling, likelihoods, export)."""
        module.load_state_dict(self._shadow, strict=True)

    def _check_keys(self, keys: Iterable[str], what: str) -> None:
        keys = set(keys)
        if keys != set(self._shadow):
            missing = sorted(set(self._shadow) - keys)[:5]
            extra = sorted(keys - set(self._shadow))[:5]
            raise ValueError(f"EMA: {what} keys differ from the tracked module (missing {missing}, unexpected {extra})")

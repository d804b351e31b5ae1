"""LR schedule (a reference value), LAMB against a float64 hand computation, real EMA
(docs/methods.md#training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from geopipe.pipeline.train.optim import EMA, lr_at, make_optimizer, set_lr


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),
        (1, 1.6e-6),
        (250, 4e-4),
        (500, 8e-4),
        # the oracle's "lr(250,250)" and "lr(500,250)" are steps 250,250 and 500,250 (thousands separators):
        # (500,250 − 500)/(1e6 − 500) = ½ exactly, hence 4e-4
        (250_250, 6.829538e-4),
        (500_250, 4e-4),
        (1_000_000, 0.0),
    ],
)
def test_lr_oracle(step, expected):
    assert lr_at(step, lr0=8e-4, warmup=500, total=1_000_000) == pytest.approx(expected, rel=1e-6, abs=1e-15)


def test_lr_shape_and_validation():
    lrs = [lr_at(s, lr0=1.0, warmup=10, total=100) for s in range(0, 120)]
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warm-up rises from 0 to lr0
    assert lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then decays, and stays at 0 after total
    assert lrs[100:] == [0.0] * 20
    assert lr_at(0, lr0=1.0, warmup=0, total=10) == 1.0
    with pytest.raises(ValueError, match="warmup"):
        lr_at(5, lr0=1.0, warmup=10, total=10)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, lr0=1.0, total=10)


def _lamb_reference(thetas, grads_per_step, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """LAMB as documented, in float64 NumPy, one tensor at a time."""
    thetas = [t.copy() for t in thetas]
    m = [np.zeros_like(t) for t in thetas]
    v = [np.zeros_like(t) for t in thetas]
    for k, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat, v_hat = m[i] / (1 - b1**k), v[i] / (1 - b2**k)
            r = m_hat / (np.sqrt(v_hat) + eps) + wd * thetas[i]
            tn, rn = np.linalg.norm(thetas[i]), np.linalg.norm(r)
            trust = tn / rn if tn > 0 and rn > 0 else 1.0
            thetas[i] = thetas[i] - lr * trust * r
    return thetas


@pytest.mark.parametrize("foreach", [False, True])  # timm picks multi-tensor kernels on CUDA: test both paths
@pytest.mark.parametrize("wd", [0.05, 0.0])
def test_lamb_matches_float64_reference(wd, foreach):
    rng = np.random.default_rng(0)
    init = [rng.normal(size=(3, 4)), rng.normal(size=4), np.zeros(2), rng.normal(size=(2, 2))]
    grads = [[rng.normal(size=t.shape) for t in init] for _ in range(3)]
    grads[0][3] = np.zeros((2, 2))  # a zero gradient at step 1
    lrs = [0.1, 0.05, 0.02]
    params = [nn.Parameter(torch.tensor(t)) for t in init]
    opt = make_optimizer("lamb", params, lr=lrs[0], weight_decay=wd, betas=(0.9, 0.999))
    opt.param_groups[0]["foreach"] = foreach
    for step_grads, lr in zip(grads, lrs):
        set_lr(opt, lr)
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    for p, ref in zip(params, _lamb_reference(init, grads, lrs, wd)):
        np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-14)


def test_optimizer_registry():
    p = [nn.Parameter(torch.zeros(2))]
    assert isinstance(make_optimizer("adamw", p, lr=1e-3, weight_decay=0.01), torch.optim.AdamW)
    with pytest.raises(ValueError, match=r"unknown optimizer 'lamd'; choose one of \['adamw', 'lamb'\]"):
        make_optimizer("lamd", p, lr=1e-3, weight_decay=0.01)
    with pytest.raises(ValueError, match="betas"):
        make_optimizer("lamb", p, lr=1e-3, weight_decay=0.01, betas=(0.9, 1.0))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))


def test_ema_is_a_real_ema():
    """A real EMA: ema = 1, θ = 0, decay 0.999 → 0.999 (the reference's inverted update gives 0.001)."""
    m = _Tiny()
    ema = EMA(m, decay=0.999)
    with torch.no_grad():
        m.w.zero_()
        m.frozen.fill_(5.0)
        m.count.fill_(7.0)
    ema.update(m)
    sd = ema.state_dict()
    torch.testing.assert_close(sd["w"], torch.full((3,), 0.999, dtype=torch.float64), rtol=0, atol=1e-15)
    assert float(sd["frozen"][0]) == 5.0 and float(sd["count"]) == 7.0  # non-trainable state is copied
    for _ in range(9):
        ema.update(m)
    torch.testing.assert_close(ema.state_dict()["w"], torch.full((3,), 0.999**10, dtype=torch.float64), rtol=1e-13, atol=0)
    assert float(m.w.detach()[0]) == 0.0  # update never touches the live weights


def test_ema_state_round_trip_and_copy_to():
    m = _Tiny()
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        m.w.mul_(3.0)
    ema.update(m)
    other = EMA(_Tiny(), decay=0.9)
    other.load_state_dict({k: v.clone() for k, v in ema.state_dict().items()})
    target = _Tiny()
    other.copy_to(target)
    torch.testing.assert_close(target.w.detach(), torch.full((3,), 0.9 + 0.1 * 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict({"w": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ValueError, match="decay"):
        EMA(m, decay=1.5)
    assert math.isclose(other.decay, 0.9)

"""BayesCap heads on frozen embeddings: the MLP and its explicit training loop on viewpoint
pairs (BayesCap: reconstruct view 1, explain view 2; BayesCapCycle: both directions).

Network (the vector form of BayesCap, trunk d → h → h → d with a residual):
``x' = trunk(x) + x``, trunk = Linear(d,h) ReLU Linear(h,h) ReLU Dropout(p) Linear(h,d);
heads on x': μ = Linear(d,hh) ReLU Linear(hh,d); h_a (read as 1/α) and h_b (β) =
Linear(d,hh) ReLU Linear(hh,d) then ReLU (or softplus), last bias shifted by +1 so no output
starts dead. Defaults h = d/2, hh = d for d ≤ 512 else 128, p = 0.1. Training: Adam(lr 1e-4), constant LR, batch 96, seeded; the checkpoint kept
is the one with the lowest validation loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from geopipe.pipeline.uncertainty.losses import GGDLossConfig, bc_loss, bcc_loss

__all__ = ["BAYESCAP_METHODS", "BayesCapConfig", "BayesCapMLP", "BayesCapTrainConfig", "TrainLog", "bayescap_parameter_counts", "train_bayescap",
           "network_config"]

#: Training objectives: BayesCap (one direction per pair, randomly ordered) and BayesCapCycle.
BAYESCAP_METHODS = ("bayescap", "bayescap-cycle")


@dataclass(frozen=True)
class BayesCapConfig:
    """Network sizes: dim d; hidden h (None: d // 2); head_hidden (None: d if d ≤ 512 else 128);
    dropout p; head_activation relu|softplus of the 1/α and β heads; head_bias_init added to the
    PyTorch-default bias of their last Linear (0 = the official init, where ReLU outputs that
    start negative for every input stay dead: β = eps, lgamma(1/eps) ≈ 8e4 dominates the loss)."""

    dim: int
    hidden: int | None = None
    head_hidden: int | None = None
    dropout: float = 0.1
    head_activation: str = "relu"
    head_bias_init: float = 1.0

    def resolved(self) -> BayesCapConfig:
        if self.head_activation not in ("relu", "softplus"):
            raise ValueError(f"unknown head_activation {self.head_activation!r}; choose relu or softplus")
        return BayesCapConfig(self.dim, self.hidden or max(self.dim // 2, 1),
                              self.head_hidden or (self.dim if self.dim <= 512 else 128), self.dropout, self.head_activation,
                              self.head_bias_init)


def _head(d: int, hh: int, final: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(d, hh), nn.ReLU(), nn.Linear(hh, d)]
    return nn.Sequential(*layers, final) if final is not None else nn.Sequential(*layers)


class BayesCapMLP(nn.Module):
    """x (B, d) → (μ, h_a, h_b), each (B, d); h_a ≥ 0 is read as 1/α, h_b ≥ 0 as β."""

    def __init__(self, cfg: BayesCapConfig):
        super().__init__()
        c = cfg.resolved()
        self.cfg = c
        d, h, hh = c.dim, c.hidden, c.head_hidden
        self.trunk = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Dropout(c.dropout), nn.Linear(h, d))
        act = nn.ReLU if c.head_activation == "relu" else nn.Softplus
        self.mu = _head(d, hh, None)
        self.inv_alpha = _head(d, hh, act())
        self.beta = _head(d, hh, act())
        with torch.no_grad():  # start the ReLU heads alive (β ≈ 1, 1/α ≈ 1): a head that starts
            for head in (self.inv_alpha, self.beta):  # negative for every input gets no gradient, ever
                head[2].bias.add_(c.head_bias_init)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.trunk(x) + x
        return self.mu(z), self.inv_alpha(z), self.beta(z)


def bayescap_parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trunk", "per_head", "total"} parameter counts."""
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {"trunk": n(model.trunk), "per_head": n(model.mu), "total": n(model)}


@dataclass(frozen=True)
class BayesCapTrainConfig:
    """method bayescap|bayescap-cycle; steps; batch; lr (Adam, constant); val_every; seed; loss settings."""

    method: str = "bayescap-cycle"
    steps: int = 2000
    batch: int = 96
    lr: float = 1e-4
    val_every: int = 200
    seed: int = 0
    loss: GGDLossConfig = field(default_factory=GGDLossConfig)


@dataclass(frozen=True)
class TrainLog:
    """best_step / best_val_loss of the kept weights; history: (step, train loss, val loss) rows;
    seconds of training; pairs_per_s: directed pairs processed per second."""

    best_step: int
    best_val_loss: float | None
    history: list
    seconds: float
    pairs_per_s: float


def _sample(adj_ptr: np.ndarray, adj: np.ndarray, anchors: np.ndarray, n: int, rng: np.random.Generator):
    """n (anchor, partner) rows: anchors uniform among those with partners, partner uniform."""
    a = anchors[rng.integers(0, anchors.size, n)]
    deg = adj_ptr[a + 1] - adj_ptr[a]
    b = adj[adj_ptr[a] + (rng.random(n) * deg).astype(np.int64)]
    return a, b


def _loss(model: nn.Module, e1: torch.Tensor, e2: torch.Tensor, cfg: BayesCapTrainConfig, swap: torch.Tensor | None) -> torch.Tensor:
    if cfg.method == "bayescap-cycle":
        return bcc_loss(model(e1), model(e2), e1, e2, cfg.loss)
    if swap is not None:  # random order per pair (one direction of BayesCap)
        e1, e2 = torch.where(swap[:, None], e2, e1), torch.where(swap[:, None], e1, e2)
    return bc_loss(model(e1), e1, e2, cfg.loss)


def _adjacency(pairs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of the undirected pairs (P, 2) over n records: (ptr (n+1,), neighbours, anchors with ≥ 1)."""
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.argsort(src, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, src + 1, 1)
    return np.cumsum(ptr), dst[order], np.unique(src)


def train_bayescap(model: BayesCapMLP, embeddings: np.ndarray, train_pairs: np.ndarray, val_pairs: np.ndarray | None,
                   cfg: BayesCapTrainConfig, progress=None) -> TrainLog:
    """Train ``model`` in place on pairs (P, 2) of rows of ``embeddings`` (N, d); the weights of
    the lowest validation loss (or the last, without validation pairs) are loaded at the end.
    ``progress`` (optional) is called after every step with (step, steps, the last logged
    (step, train loss, validation loss or None), or None before the first validation)."""
    if cfg.method not in BAYESCAP_METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; choose one of {list(BAYESCAP_METHODS)}")
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    ptr, adj, anchors = _adjacency(train_pairs, emb.shape[0])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    best = (math.inf, 0, {k: v.clone() for k, v in model.state_dict().items()})
    history, t0, running = [], time.perf_counter(), []
    for step in range(1, cfg.steps + 1):
        model.train()
        a, b = _sample(ptr, adj, anchors, cfg.batch, rng)
        swap = torch.from_numpy(rng.random(cfg.batch) < 0.5)
        loss = _loss(model, emb[a], emb[b], cfg, swap)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step % cfg.val_every == 0 or step == cfg.steps:
            val = _val_loss(model, emb, val_pairs, cfg) if val_pairs is not None and len(val_pairs) else None
            history.append((step, float(np.mean(running)), val))
            running = []
            score = val if val is not None else history[-1][1]
            if score < best[0]:
                best = (score, step, {k: v.clone() for k, v in model.state_dict().items()})
        if progress is not None:
            progress(step, cfg.steps, history[-1] if history else None)
    model.load_state_dict(best[2])
    model.eval()
    seconds = time.perf_counter() - t0
    per_step = 2 if cfg.method == "bayescap-cycle" else 1
    return TrainLog(best_step=best[1], best_val_loss=None if val_pairs is None or not len(val_pairs) else best[0],
                    history=history, seconds=seconds, pairs_per_s=cfg.steps * cfg.batch * per_step / max(seconds, 1e-9))


@torch.no_grad()
def _val_loss(model: nn.Module, emb: torch.Tensor, pairs: np.ndarray, cfg: BayesCapTrainConfig, batch: int = 4096) -> float:
    model.eval()
    total, n = 0.0, 0
    for s in range(0, len(pairs), batch):
        p = pairs[s:s + batch]
        e1, e2 = emb[p[:, 0]], emb[p[:, 1]]
        total += float(bcc_loss(model(e1), model(e2), e1, e2, cfg.loss)) * len(p)  # symmetric: order-free
        n += len(p)
    return total / n


def network_config(model: BayesCapMLP) -> dict:
    """The resolved network sizes, for the checkpoint JSON."""
    return {"kind": "bayescap_mlp", **asdict(model.cfg)}

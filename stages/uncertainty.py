"""BayesCap stage: viewpoint pairs from a store → a trained BayesCap / BayesCapCycle checkpoint
(safetensors + JSON), and scoring of store rows with it (log_u, log_u_alea, log_u_epi).

Pairs are mined on the store's records except the evaluation queries (``exclude_value`` of
``exclude_column``, default split == "test"). With too few pairs the ``no_pairs_policy``
decides: ``skip`` (default: nothing is trained, the result says why; evaluate then has the
training-free scores only), ``identity`` (each record paired with a slightly noised copy of
itself: u measures atypicality, a weak proxy), ``relaxed_radius`` (retry at a 75 m radius with
the visual filter; pairs marked low quality). Never silent: the status and reason are in the
result and the checkpoint JSON.

``pair_rule``: ``viewpoint`` mines geo pairs (pipeline/retrieval/viewpoints.py; on stores
without headings it widens to place pairs within 1-25 km where 25 m finds too few, and says so);
``cosplace_classes`` pairs records of one CosPlace class (UTM 10 m cell × 30° heading bin, other
captures); ``auto`` (default) takes the classes when the store carries UTM positions and
headings (VPR datasets extracted with ``--labels vpr-name``), else viewpoint pairs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config, save_checkpoint
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.limits import MAX_STEPS
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.retrieval.split import decode_meta, group_ids
from geopipe.pipeline.retrieval.viewpoints import PairConfig, PairSet, class_pair_set, mine_pairs
from geopipe.pipeline.store.reader import EmbeddingStore, open_store
from geopipe.pipeline.uncertainty.bayescap import BAYESCAP_METHODS, BayesCapConfig, BayesCapMLP, BayesCapTrainConfig, network_config, train_bayescap
from geopipe.pipeline.uncertainty.losses import GGDLossConfig
from geopipe.pipeline.uncertainty.scoring import score_rows
from geopipe.pipeline.vpr.classes import cosplace_classes
from geopipe.pipeline.vpr.positives import store_utm
from geopipe.schemas.checkpoint import CONFIG_FILE, GENERATIVE, UNCERTAINTY, checkpoint_method
from geopipe.schemas.predictions import score_columns

__all__ = ["NO_PAIRS_POLICIES", "PAIR_RULES", "BayesCapStageConfig", "BayesCapStageResult", "run_train_bayescap", "insufficient_hint",
           "ScoreFileConfig",
           "ScoreFileResult", "run_score_file"]

NO_PAIRS_POLICIES = ("skip", "identity", "relaxed_radius")
PAIR_RULES = ("auto", "viewpoint", "cosplace_classes")


@dataclass(frozen=True)
class BayesCapStageConfig:
    """Options of ``geopipe bayescap train``; its defaults are stated here only (docs/retrieval_uncertainty.md;
    batch 96 as the thesis, steps scaled down for CPU, and so lr 1e-3, not the thesis's 1e-4: at
    2,000 steps 1e-4 leaves the heads undertrained — on the geoclip world its validation loss
    was still falling at the last step, 0.0088 against 0.0035 with 1e-3, and log_u's failure
    AUROC 0.67 against 0.71)."""

    store: str
    out: str
    method: str = "bayescap-cycle"
    steps: int = 2000
    batch: int = 96
    lr: float = 1e-3
    val_every: int = 200
    residual_form: str = "power"
    lambda1: float = 1.0
    lambda2: float = 1e-4
    hidden: int | None = None
    head_hidden: int | None = None
    dropout: float = 0.1
    head_activation: str = "relu"
    pairs: PairConfig = field(default_factory=PairConfig)
    no_pairs_policy: str = "skip"
    exclude_column: str = "split"
    exclude_value: str = "test"
    heading_field: str = "heading_deg"
    capture_field: str = "capture_id"
    pair_rule: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.method not in BAYESCAP_METHODS:
            raise ConfigError(f"unknown uncertainty method {self.method!r}; choose one of {list(BAYESCAP_METHODS)}")
        if self.pair_rule not in PAIR_RULES:
            raise ConfigError(f"unknown pair rule {self.pair_rule!r}; choose one of {list(PAIR_RULES)}")
        if self.no_pairs_policy not in NO_PAIRS_POLICIES:
            raise ConfigError(f"unknown no_pairs_policy {self.no_pairs_policy!r}; choose one of {list(NO_PAIRS_POLICIES)}")
        for name, option in (("steps", "--steps"), ("batch", "--batch-size"), ("val_every", "--val-every")):
            check_int(getattr(self, name), option, 1, where=self.method, maximum=MAX_STEPS if name == "steps" else None)
        check_int(self.pairs.min_pairs, "--min-pairs", 1, where=self.method)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"{self.method}: --lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"{self.method}: dropout must lie in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class BayesCapStageResult:
    """status: "trained" | "insufficient_pairs" (skip policy: nothing written); out: checkpoint
    directory or None; pairs: pair statistics; history: (step, train loss, val loss) rows."""

    status: str
    out: str | None
    message: str
    pairs: dict
    history: list
    best_step: int | None
    seconds: float
    pairs_per_s: float | None


def _meta_floats(store: EmbeddingStore, name: str) -> np.ndarray | None:
    if name not in store.attrs["meta_fields"]:
        return None
    vals = decode_meta(store.meta[name][:])
    return np.array([float(v) if isinstance(v, (int, float)) else np.nan for v in vals])


def _pairs(store: EmbeddingStore, emb: np.ndarray, latlon: np.ndarray, cfg: BayesCapStageConfig) -> tuple[PairSet, str]:
    fields = store.attrs["meta_fields"]
    capture = group_ids(decode_meta(store.meta[cfg.capture_field][:])) if cfg.capture_field in fields else None
    exclude = None
    if cfg.exclude_column in fields:
        exclude = np.array([str(v) == cfg.exclude_value for v in decode_meta(store.meta[cfg.exclude_column][:])])
    heading = _meta_floats(store, cfg.heading_field)
    utm = store_utm(store) if cfg.pair_rule != "viewpoint" else None
    has_classes = utm is not None and heading is not None and np.isfinite(heading).any()
    if cfg.pair_rule == "cosplace_classes" and not has_classes:
        raise GeopipeError(f"store {store.path}: --pair-rule cosplace_classes needs UTM positions and headings "
                           f"(utm_east/utm_north and {cfg.heading_field!r} metadata: extract VPR images with --labels vpr-name)")
    if has_classes:
        classes = cosplace_classes(utm.east_north, heading)
        return class_pair_set(classes, emb, latlon, heading, capture, exclude, cfg.pairs), "cosplace_classes"
    ps = mine_pairs(emb, latlon, heading, capture, exclude, cfg.pairs)
    if ps.status == "ok" or cfg.no_pairs_policy != "relaxed_radius":
        return ps, _pair_kind(ps.stats)
    relaxed = replace(cfg.pairs, pair_radius_m=75.0, visual_filter="negatives_calibrated")
    return mine_pairs(emb, latlon, heading, capture, exclude, relaxed), "relaxed_radius (low quality)"


def _radius(m: float) -> str:
    return f"{m / 1000:g} km" if m >= 1000 else f"{m:g} m"


def _pair_kind(stats: dict) -> str:
    """``viewpoint`` or, where mining widened the radius, what was kept instead and why."""
    if stats.get("widened_from_m") is None:
        return "viewpoint"
    return (f"place pairs within {_radius(stats['radius_m'])}: too few viewpoint pairs within "
            f"{_radius(stats['widened_from_m'])} ({stats['tried'][0]['n_pairs']})")


def insufficient_hint(stats: dict, min_pairs: int) -> str:
    """What to change, as one clause naming the flag and its value, when mining found too few pairs."""
    n = int(stats["n_pairs"])
    if n >= 2:
        return (f"pass --min-pairs {n} to train on these {n} pairs (it also lifts the pairable-records floor), or "
                "--no-pairs-policy identity for identity pairs (weak: atypicality)")
    return (f"no two records lie within {_radius(stats['radius_m'])} of each other: pass --no-pairs-policy identity to train on "
            "identity pairs (weak: atypicality)")


def _identity_pairs(emb: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each record and a copy with Gaussian noise σ = 0.01/√d, renormalised: rows (i, N + i)."""
    rng = np.random.default_rng(seed)
    n, d = emb.shape
    noisy = emb + rng.normal(scale=0.01 / math.sqrt(d), size=emb.shape).astype(np.float32)
    noisy /= np.maximum(np.linalg.norm(noisy, axis=1, keepdims=True), 1e-12)
    both = np.concatenate([emb, noisy]).astype(np.float32)
    idx = rng.permutation(n)
    cut = max(1, int(0.8 * n))
    return both, np.stack([idx[:cut], idx[:cut] + n], 1), np.stack([idx[cut:], idx[cut:] + n], 1)


def _refuse_generative_out(out: str) -> None:
    """A BayesCap run replaces the checkpoint in ``out`` (it is retrained, not resumed), but never
    a generative model's; an ``out`` that is a file or cannot be created is refused before training."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise GeopipeError(f"--out {out} exists and is not a directory; give a checkpoint directory")
    if not os.path.isfile(os.path.join(out, CONFIG_FILE)):
        existed = os.path.isdir(out)
        fsio.makedirs(out, "checkpoint folder")  # one line now when it cannot be created
        if not existed:  # made again by the save: a run that trains nothing leaves nothing behind
            with contextlib.suppress(OSError):
                os.rmdir(out)
        return
    saved = load_checkpoint_config(out)
    if saved["kind"] == GENERATIVE:
        raise GeopipeError(f"{out} holds a generative {checkpoint_method(saved)!r} model that BayesCap would replace; give --out "
                           "another directory")


def _tick(bar: Progress, step: int, last) -> None:
    """One training step done; the last logged losses as the bar's postfix."""
    if last is not None and last[0] == step:
        bar.set_postfix(loss=f"{last[1]:.4f}", **({} if last[2] is None else {"val": f"{last[2]:.4f}"}))
    bar.update(1)


def run_train_bayescap(cfg: BayesCapStageConfig) -> BayesCapStageResult:
    """Mine pairs, apply the no-pairs policy, train, save the checkpoint (see the module docstring)."""
    t0 = time.perf_counter()
    _refuse_generative_out(cfg.out)
    store = open_store(cfg.store)
    if len(store) == 0:
        raise GeopipeError(f"store {store.path} has no records to train BayesCap on")
    emb = np.asarray(store.embeddings[:], dtype=np.float32)
    latlon = store.latlon[:].astype(np.float64)
    ps, kind = _pairs(store, emb, latlon, cfg)
    stats = {**ps.stats, "status": ps.status, "kind": kind}
    train_emb, train_pairs, val_pairs = emb, ps.train, ps.val
    if ps.status != "ok":
        widened = "" if ps.stats.get("widened_from_m") is None else f", widened from {_radius(ps.stats['widened_from_m'])}"
        why = (f"insufficient_pairs: {ps.stats['n_pairs']} pairs within {_radius(ps.stats['radius_m'])}{widened} (need "
               f"{cfg.pairs.min_pairs}) and {ps.stats['pairable_fraction']:.1%} of records pairable (need "
               f"{cfg.pairs.min_pairable_fraction:.0%})")
        if cfg.no_pairs_policy in ("skip", "relaxed_radius"):
            return BayesCapStageResult(status="insufficient_pairs", out=None, pairs=stats, history=[], best_step=None,
                                       message=f"{why}; not trained (no_pairs_policy={cfg.no_pairs_policy}): evaluate "
                                               "--uncertainty will use the training-free scores only; to train, "
                                               f"{insufficient_hint(ps.stats, cfg.pairs.min_pairs)}",
                                       seconds=time.perf_counter() - t0, pairs_per_s=None)
        train_emb, train_pairs, val_pairs = _identity_pairs(emb, cfg.seed)
        stats["kind"] = "identity (weak: atypicality, not viewpoint change)"
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
    model = BayesCapMLP(BayesCapConfig(emb.shape[1], cfg.hidden, cfg.head_hidden, cfg.dropout, cfg.head_activation))
    loss = GGDLossConfig(residual_form=cfg.residual_form, lambda1=cfg.lambda1, lambda2=cfg.lambda2)
    tcfg = BayesCapTrainConfig(method=cfg.method, steps=cfg.steps, batch=cfg.batch, lr=cfg.lr, val_every=cfg.val_every,
                       seed=cfg.seed, loss=loss)
    with Progress(total=cfg.steps, desc=f"bayescap train ({cfg.method})", unit="step", enabled=cfg.progress) as bar:
        log = train_bayescap(model, train_emb, train_pairs, val_pairs, tcfg, progress=lambda step, _, last: _tick(bar, step, last))
    config = {"kind": UNCERTAINTY, "method": cfg.method, "network": network_config(model), "embed_dim": int(emb.shape[1]),
              "backbone": store.attrs.get("backbone"), "step": int(log.best_step),
              "store": store.path, "store_fingerprint": store.attrs.get("fingerprint"),
              "train": {**asdict(cfg), "pairs": asdict(cfg.pairs)}, "loss": asdict(loss), "pair_stats": stats,
              "history": log.history}
    save_checkpoint(cfg.out, model_state=model.state_dict(), config=json.loads(json.dumps(config, default=str)))
    return BayesCapStageResult(status="trained", out=cfg.out, pairs=stats, history=log.history, best_step=log.best_step,
                               message=f"trained on {len(train_pairs)} {stats['kind']} pairs", seconds=time.perf_counter() - t0,
                               pairs_per_s=log.pairs_per_s)


@dataclass(frozen=True)
class ScoreFileConfig:
    """Score the records of a predictions *file* (keys of ``store``, e.g. a retrieval table of
    its queries) with the BayesCap ``checkpoint`` and write log_u, log_u_alea, log_u_epi into
    it; ``checkpoint`` None clears those columns (no checkpoint trained). Same rows and seed as
    ``geopipe retrieve --bayescap``: the same numbers."""

    predictions: str
    store: str
    checkpoint: str | None
    mc_passes: int = 15
    seed: int = 0


@dataclass(frozen=True)
class ScoreFileResult:
    out: str
    n_records: int
    checkpoint: str | None
    seconds: float


def run_score_file(cfg: ScoreFileConfig) -> ScoreFileResult:
    """Write (or clear) the BayesCap columns of ``cfg.predictions`` (see :class:`ScoreFileConfig`)."""
    from geopipe.pipeline.artifacts.predictions import read_columns, replace_columns

    t0 = time.perf_counter()
    keys = [str(k) for k in read_columns(cfg.predictions, ["key"]).column("key").to_pylist()]
    names = score_columns("bayescap")
    if cfg.checkpoint is None:
        replace_columns(cfg.predictions, dict.fromkeys(names), {"bayescap": None})
        return ScoreFileResult(cfg.predictions, len(keys), None, time.perf_counter() - t0)
    store = open_store(cfg.store)
    row_of = {str(k): i for i, k in enumerate(np.asarray(store.keys[:]).astype(str).tolist())}
    missing = [k for k in keys if k not in row_of]
    if missing:
        raise GeopipeError(f"{cfg.predictions}: {len(missing)} keys (first {missing[0]!r}) are not records of store "
                           f"{store.path}; score it with the store its predictions were made from")
    scores = score_rows(cfg.checkpoint, store, np.array([row_of[k] for k in keys], dtype=np.int64), passes=cfg.mc_passes,
                        seed=cfg.seed)
    replace_columns(cfg.predictions, scores, {"bayescap": {"checkpoint": cfg.checkpoint, "mc_passes": cfg.mc_passes}})
    return ScoreFileResult(cfg.predictions, len(keys), cfg.checkpoint, time.perf_counter() - t0)

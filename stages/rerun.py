"""Reruns that do only new work: what a pipeline run must redo since the last successful one.

The last successful run of a pipeline leaves ``<workdir>/geopipe-run-state.json``: a key per
step, each a hash of that step's inputs (the stores' fingerprints and rows, the step's config,
the key of the step before it), plus the evaluation table. A rerun recomputes the keys after
extraction (which appends only new shards by itself) and redoes a step only when its key
changed or its output is gone; otherwise it says why it skipped. When the training data or
options changed, the model is retrained from scratch (``on_new_data = "scratch"``) or the last
checkpoint is continued for ``continue_steps`` more steps (``"continue"``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError

__all__ = ["RerunConfig", "RerunPlan", "UncertaintyPlan", "STATE_FILE", "plan_rerun", "plan_uncertainty", "save_run_state",
           "save_uncertainty_state", "load_run_state", "store_fingerprint"]

#: The state file of the last successful run, in the pipeline's workdir.
STATE_FILE = "geopipe-run-state.json"
_VOLATILE = ("progress", "device", "dask")
_ON_NEW_DATA = ("scratch", "continue")


@dataclass(frozen=True)
class RerunConfig:
    """The ``[rerun]`` table: ``skip_unchanged`` skips train/predict/evaluate when their inputs
    are unchanged since the last successful run; ``on_new_data`` ("scratch" or "continue")
    says how a changed training store (or train options) retrains; ``continue_steps``: steps
    added to the last checkpoint's with "continue"."""

    skip_unchanged: bool = True
    on_new_data: str = "scratch"
    continue_steps: int = 1000

    def __post_init__(self):
        if self.on_new_data not in _ON_NEW_DATA:
            raise ConfigError(f"[rerun] on_new_data {self.on_new_data!r}: choose one of {list(_ON_NEW_DATA)}")
        if self.continue_steps < 1:
            raise ConfigError(f"[rerun] continue_steps must be positive, got {self.continue_steps}")


@dataclass(frozen=True)
class RerunPlan:
    """What to run: ``train`` is the (possibly adjusted) train config or None to skip; ``keys``
    the step keys to record once the run succeeds; ``reasons`` one line per decision."""

    train: object | None
    predict: object | None
    evaluate: bool
    keys: dict
    reasons: tuple[str, ...]
    previous: dict | None


def store_fingerprint(path: str | None) -> str | None:
    """The store's content fingerprint and row count ("<fingerprint>:<rows>"), None when absent."""
    if not path:
        return None
    from geopipe.pipeline.store.reader import StoreError, open_store

    try:
        attrs = open_store(path).attrs
    except StoreError:
        return None
    return f"{attrs.get('fingerprint', '')}:{attrs['rows']}"


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _options(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _VOLATILE}


def load_run_state(workdir: str) -> dict | None:
    """The last successful run's state, or None (no run yet, or an unreadable file)."""
    from geopipe.pipeline.core.limits import load_json

    path = os.path.join(workdir, STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return load_json(path, "run state")  # size and depth limits: a hostile file is no state
    except ConfigError:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def save_run_state(workdir: str, plan: RerunPlan, table: str, reports: list) -> None:
    """Record a successful run of the generative branch (atomically): its step keys and
    evaluation table (the uncertainty branch's entry is kept)."""
    state = {"keys": plan.keys, "table": table, "reports": reports, "finished": _now()}
    kept = (load_run_state(workdir) or {}).get("uncertainty")
    if kept is not None:
        state["uncertainty"] = kept
    fsio.write_atomic(os.path.join(workdir, STATE_FILE), json.dumps(state, default=str).encode())


def save_uncertainty_state(workdir: str, plan: UncertaintyPlan, entry: dict) -> None:
    """Record a successful run of the uncertainty branch (atomically): its step keys and
    ``entry`` (the BayesCap status, the tables); the generative branch's state is kept."""
    state = load_run_state(workdir) or {}
    state["uncertainty"] = {**entry, "keys": plan.keys, "finished": _now()}
    fsio.write_atomic(os.path.join(workdir, STATE_FILE), json.dumps(state, default=str).encode())


def _continue_from(train_cfg, steps: int):
    """The train config that continues the checkpoint in ``train_cfg.out`` for ``steps`` more."""
    from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config

    done = int(load_checkpoint_config(train_cfg.out).get("step", 0))
    extra = {"allow_changes": True} if "allow_changes" in {f.name for f in dataclasses.fields(train_cfg)} else {}
    return dataclasses.replace(train_cfg, steps=done + steps, resume=True, **extra)


def plan_rerun(cfg, rerun: RerunConfig, baseline_store: str | None = None) -> RerunPlan:
    """Decide what ``cfg`` (a :class:`geopipe.stages.config.PipelineConfig`) must redo, after its
    extraction ran."""
    train_key = _key(store_fingerprint(cfg.train.store), _options(cfg.train))
    predict_key = _key(train_key, store_fingerprint(cfg.predict.store), _options(cfg.predict))
    evaluate_key = _key(predict_key, _options(cfg.evaluate), store_fingerprint(baseline_store))
    keys = {"train": train_key, "predict": predict_key, "evaluate": evaluate_key}
    prev = load_run_state(cfg.workdir)
    old = (prev or {}).get("keys", {}) if rerun.skip_unchanged else {}
    has_model = fsio.exists(os.path.join(cfg.train.out, "config.json"))
    reasons = []

    train = cfg.train
    if old.get("train") == train_key and has_model:
        train = None
        reasons.append(f"train skipped: store {cfg.train.store} and train options unchanged since the run of {prev['finished']}")
    elif prev is not None and has_model:
        if rerun.on_new_data == "continue":
            train = _continue_from(cfg.train, rerun.continue_steps)
            reasons.append(f"train continues {cfg.train.out} to step {train.steps}: the training store or options changed")
        else:
            train = dataclasses.replace(cfg.train, resume=False)
            reasons.append("train from scratch: the training store or options changed")
    predict = cfg.predict
    if train is None and old.get("predict") == predict_key and fsio.exists(cfg.predict.out):
        predict = None
        reasons.append(f"predict skipped: model, store {cfg.predict.store} and options unchanged")
    elif "overwrite" in {f.name for f in dataclasses.fields(predict)}:
        predict = dataclasses.replace(predict, overwrite=True)  # a new model's predictions replace the old ones
    outs_there = cfg.evaluate.out is None or fsio.exists(cfg.evaluate.out)
    evaluate = not (predict is None and old.get("evaluate") == evaluate_key and outs_there and prev and "table" in prev)
    if not evaluate:
        reasons.append("evaluate skipped: predictions and options unchanged (table of the last run)")
    return RerunPlan(train, predict, evaluate, keys, tuple(reasons), prev)


@dataclass(frozen=True)
class UncertaintyPlan:
    """What the uncertainty branch redoes: ``retrieve``/``bayescap`` the configs to run or None
    (skip); ``score``/``evaluate`` whether to run them; ``previous`` the last successful run's
    entry (its BayesCap status and tables)."""

    retrieve: object | None
    bayescap: object | None
    score: bool
    evaluate: bool
    keys: dict
    reasons: tuple[str, ...]
    previous: dict | None


def _checkpoint_key(path: str | None) -> str | None:
    if not path:
        return None
    from geopipe.pipeline.artifacts.checkpoint import checkpoint_identity
    from geopipe.pipeline.core.errors import GeopipeError

    try:
        return checkpoint_identity(path)
    except GeopipeError:
        return "missing"


def _file_key(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}"


def plan_uncertainty(branch, rerun: RerunConfig, workdir: str) -> UncertaintyPlan:
    """Decide what the uncertainty branch ``branch`` (a :class:`geopipe.stages.config.UncertaintyBranch`)
    must redo, after extraction (and the generative branch) ran."""
    r, bc, ev = branch.retrieve, branch.bayescap, branch.evaluate
    search = {k: v for k, v in _options(r).items() if k not in ("uncertainty_checkpoint", "mc_passes")}
    keys = {"retrieve": _key(store_fingerprint(r.query), store_fingerprint(r.database), search)}
    keys["bayescap"] = _key(store_fingerprint(bc.store), _options(bc)) if bc else None
    keys["score"] = _key(keys["retrieve"], keys["bayescap"] or _checkpoint_key(r.uncertainty_checkpoint), r.mc_passes, r.seed)
    keys["evaluate"] = _key(keys["score"], _options(ev), [_file_key(p) for p in ev.predictions[1:]])
    prev = (load_run_state(workdir) or {}).get("uncertainty") if rerun.skip_unchanged else None
    old = (prev or {}).get("keys", {})
    reasons = []
    retrieve = r
    if old.get("retrieve") == keys["retrieve"] and fsio.exists(r.out):
        retrieve = None
        reasons.append(f"retrieve skipped: stores {r.query}, {r.database or r.query} and search options unchanged")
    bayescap = bc
    was_trained = ((prev or {}).get("bayescap") or {}).get("status") == "trained"
    if bc is not None and old.get("bayescap") == keys["bayescap"] and (not was_trained or fsio.exists(os.path.join(bc.out, "config.json"))):
        bayescap = None
        reasons.append(f"bayescap skipped: store {bc.store} and options unchanged ({prev['bayescap']['status']})")
    score = retrieve is not None or old.get("score") != keys["score"]
    if not score:
        reasons.append("score skipped: retrieval table and BayesCap checkpoint unchanged")
    outs_there = ev.out is None or fsio.exists(ev.out)
    evaluate = score or old.get("evaluate") != keys["evaluate"] or not outs_there or "table" not in (prev or {})
    if not evaluate:
        reasons.append("evaluate --uncertainty skipped: predictions and options unchanged (tables of the last run)")
    return UncertaintyPlan(retrieve, bayescap, score, evaluate, keys, tuple(reasons), prev)

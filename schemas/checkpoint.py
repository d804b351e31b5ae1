"""Checkpoint directory (schema ``geopipe.checkpoint/1``); never unpickled.

    CKPT/
      model.safetensors      EMA weights used for sampling, likelihoods and export
      config.json            {"schema", "kind", "method", "network": {...}, "scheduler": {...},
                              "backbone": {...}, "embed_dim", "normalized",
                              "data_fingerprint", "train": {...}, "step", "version", "git_rev"}
      train_state.safetensors  raw weights + optimiser moments ("model.*", "optim.<i>.<name>")
      train_state.json       {"step", "rng_seed", "best_val", ...} for resume

Saves are versioned: the files are written as ``model-<step>-<token>.safetensors``,
``train_state-<step>-<token>.safetensors`` and ``train_state-<step>-<token>.json``, named in
config.json's ``"files"`` (role → file name); replacing config.json commits the save
(:mod:`geopipe.pipeline.artifacts.checkpoint`). Checkpoints without ``"files"`` use the fixed
names above. config.json may also carry ``"changes"``: [{"step", "changed": {key: [old, new]}}],
the settings a resume with ``--allow-changes`` changed, and at which step.

``"kind"`` says what the weights are: ``"generative"`` (a geolocation model of ``geopipe train``;
``"method"`` is the method's dict) or ``"uncertainty"`` (BayesCap heads of ``geopipe bayescap
train``; ``"method"`` is its name). Checkpoints written before the key existed are read by
:func:`checkpoint_kind`.
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_SCHEMA", "MODEL_FILE", "CONFIG_FILE", "TRAIN_STATE_FILE", "TRAIN_STATE_JSON", "REQUIRED_CONFIG_KEYS",
           "GENERATIVE", "UNCERTAINTY", "CHECKPOINT_KINDS", "checkpoint_kind", "checkpoint_method"]

CHECKPOINT_SCHEMA = "geopipe.checkpoint/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
REQUIRED_CONFIG_KEYS: tuple[str, ...] = ("schema", "method", "network", "embed_dim", "backbone", "step")

GENERATIVE = "generative"
UNCERTAINTY = "uncertainty"
CHECKPOINT_KINDS: tuple[str, ...] = (GENERATIVE, UNCERTAINTY)


def checkpoint_kind(config: dict) -> str:
    """``config["kind"]``; for a checkpoint written before the key existed, the old rule: a
    method dict is a generative model, a method name uncertainty heads. The value is not
    checked here (the checkpoint reader refuses one outside :data:`CHECKPOINT_KINDS`)."""
    if "kind" in config:
        return config["kind"]
    return GENERATIVE if isinstance(config.get("method"), dict) else UNCERTAINTY


def checkpoint_method(config: dict) -> str | None:
    """The registry name of the checkpoint's method (``rfm``, ``bayescap-cycle``, ...)."""
    method = config.get("method")
    return (method or {}).get("name") if checkpoint_kind(config) == GENERATIVE else method

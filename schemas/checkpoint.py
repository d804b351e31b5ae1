"""Checkpoint directory (schema ``geopipe.checkpoint/1``); never unpickled.

    CKPT/
      model.safetensors      EMA weights used for sampling, likelihoods and export
      config.json            {"schema", "method", "network": {...}, "scheduler": {...},
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
"""

from __future__ import annotations

__all__ = ["CHECKPOINT_SCHEMA", "MODEL_FILE", "CONFIG_FILE", "TRAIN_STATE_FILE", "TRAIN_STATE_JSON", "REQUIRED_CONFIG_KEYS"]

CHECKPOINT_SCHEMA = "geopipe.checkpoint/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAIN_STATE_FILE = "train_state.safetensors"
TRAIN_STATE_JSON = "train_state.json"
REQUIRED_CONFIG_KEYS: tuple[str, ...] = ("schema", "method", "network", "embed_dim", "backbone", "step")

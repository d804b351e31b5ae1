"""Resuming and saving a training run's checkpoint (for the train stage): what a resume
compares with the saved run, what it may change, and the save after each validation.
"""

from __future__ import annotations

import json
import os

from geopipe.pipeline.artifacts.checkpoint import (
    load_checkpoint_config,
    load_model_weights,
    load_train_state,
    pack_train_state,
    restore_train_state,
    save_checkpoint,
)
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.checkpoint import CONFIG_FILE, GENERATIVE, checkpoint_method

__all__ = ["resume_run", "save_run"]


#: Training options that may change on resume without --allow-changes (train longer, log differently;
#: where the checkpoint and the store are: the checkpoint resumes wherever it was moved, and the
#: store is compared by its ``data_fingerprint``, never by how its path is spelled).
#: Method options fitted after training (the hybrid's held-out calibration): not settings a resume compares.
_FITTED = ("calibration", "width_scale", "weight_temperature", "floor")

_RESUME_FREE = ("steps", "resume", "stream", "val_every", "allow_changes", "out", "store")


def _config_changes(saved: dict, config: dict, defaults: dict) -> dict:
    """Dotted key → [saved value, new value] for the store fingerprint, method, network and
    training options that differ between a saved checkpoint config and the one resuming it.
    A training option saved as None (checkpoints from before the method's defaults were
    recorded) stands for the method's ``defaults``."""
    def flat(cfg):
        out = {"data_fingerprint": cfg.get("data_fingerprint"), "embed_dim": cfg.get("embed_dim")}
        for section in ("method", "network", "train"):
            out.update({f"{section}.{k}": v for k, v in (cfg.get(section) or {}).items()
                        if not (section == "train" and k in _RESUME_FREE) and not (section == "method" and k in _FITTED)})
        out.update({f"train.{k}": v for k, v in defaults.items() if out.get(f"train.{k}", v) is None})
        return out

    old, new = flat(saved), flat(json.loads(json.dumps(config, default=str)))  # compare as JSON (tuples → lists)
    return {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def resume_run(cfg, model, optimizer, ema, generator, config: dict, method_defaults: dict) -> tuple[int, list]:
    """Continue from ``cfg.out`` when it holds a training state of the same method, store and
    options; a difference is refused, naming it, unless ``cfg.allow_changes``, which records it
    in ``config["changes"]`` (kept in every later save) so the checkpoint says what trained which steps."""
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise GeopipeError(f"--out {cfg.out} exists and is not a directory; give a checkpoint directory")
    if not os.path.exists(os.path.join(cfg.out, CONFIG_FILE)):
        return 0, []
    saved = load_checkpoint_config(cfg.out)
    if saved["kind"] != GENERATIVE or checkpoint_method(saved) != cfg.method:
        raise GeopipeError(f"{cfg.out} holds a {checkpoint_method(saved)!r} run; use --no-resume or another --out")
    packed = load_train_state(cfg.out)
    if packed is None:
        return 0, []
    changes = _config_changes(saved, config, method_defaults)
    shown = "; ".join(f"{k}: {a!r} → {b!r}" for k, a, b in ((k, *v) for k, v in list(changes.items())[:4]))
    if changes and not getattr(cfg, "allow_changes", False):
        what = "a different store" if "data_fingerprint" in changes else "different settings"
        raise GeopipeError(f"{cfg.out} was trained to step {saved['step']} with {what} ({shown}); pass --allow-changes to "
                           f"resume anyway (recorded in the checkpoint), --no-resume to start over, or another --out")
    config["changes"] = list(saved.get("changes", [])) + ([{"step": saved["step"], "changed": changes}] if changes else [])
    tensors, meta = packed
    restore_train_state(model, optimizer, tensors, meta)
    ema.load_state_dict(load_model_weights(cfg.out))
    generator.set_state(tensors["rng"])
    return int(meta["step"]), list(meta.get("history", []))


def save_run(cfg, model, optimizer, ema, generator, config, step, history):
    """Save the EMA weights, ``config`` at ``step`` and (with an optimizer) the training state to ``cfg.out``."""
    train_state, train_meta = (None, None)
    if optimizer is not None:
        train_state, train_meta = pack_train_state(model, optimizer, step=step, history=history)
        train_state["rng"] = generator.get_state()
    save_checkpoint(cfg.out, model_state=ema.state_dict(), config={**config, "step": step},
                    train_state=train_state, train_meta=train_meta)

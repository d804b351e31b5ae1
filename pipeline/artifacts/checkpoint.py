"""Checkpoint directories (schema :mod:`geopipe.schemas.checkpoint`): safetensors + JSON, never unpickled
(docs/methods.md#checkpoints).

Layout: the EMA weights, ``config.json`` (full resolved configuration plus provenance), and
for resume a train state (raw weights ``model.*`` and optimiser tensors ``optim.<param id>.<name>``
/ ``optim.group.<group>.<key>``, plus a JSON of step, seeds, optimiser scalars).

Saves are versioned: each save writes new files named ``<role>-<step>-<token>.<ext>`` (e.g.
``model-00000500-3fa2c1d9.safetensors``), then replaces ``config.json`` — which names them in its
``"files"`` entry — in one atomic rename. That rename is the commit: a process killed anywhere in
a save leaves the previous ``config.json`` and the files it names untouched, so resume and
predict always find the last complete save. Files no save names any more are deleted after the
commit. Checkpoints written before versioning (fixed names ``model.safetensors``,
``train_state.safetensors``, ``train_state.json``; no ``"files"``) are read as before. The saved
``step`` is stamped into every file, so files of two saves are never mixed silently.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import Tensor, nn

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.core.limits import load_json
from geopipe.pipeline.core.provenance import provenance
from geopipe.schemas.checkpoint import (
    CHECKPOINT_KINDS,
    CHECKPOINT_SCHEMA,
    CONFIG_FILE,
    GENERATIVE,
    MODEL_FILE,
    REQUIRED_CONFIG_KEYS,
    TRAIN_STATE_FILE,
    TRAIN_STATE_JSON,
    checkpoint_kind,
)

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint_config",
    "load_model_weights",
    "load_train_state",
    "optimizer_state_to_tensors",
    "optimizer_state_from_tensors",
    "pack_train_state",
    "restore_train_state",
    "checkpoint_identity",
    "checkpoint_files",
    "weight_shapes",
    "NETWORK_LIMITS",
]

_MODEL_PREFIX = "model."
_OPTIM_PREFIX = "optim."
#: role → the file name of checkpoints written before versioned saves (also the name stem).
_LEGACY_FILES = {"model": MODEL_FILE, "train_state": TRAIN_STATE_FILE, "train_state_json": TRAIN_STATE_JSON}
#: Names of files a save writes (fixed, versioned, or the temporary of a killed atomic write).
_OWN_FILE = re.compile(r"^\.?(model|train_state)(-\d{8}-[0-9a-f]{8})?\.(safetensors|json)(\.[0-9a-f]{12}\.tmp)?$")


class CheckpointError(GeopipeError, ValueError):
    """A checkpoint directory is missing, corrupt, incomplete or of another schema (one-line message)."""


def _atomic_write(path: Path, data: bytes) -> None:
    fsio.write_atomic(str(path), data)


def _json_bytes(obj: Any, path: Path) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot write {path}: content is not JSON-serialisable ({exc})") from None


def _tensor_bytes(tensors: Mapping[str, Tensor], step: int, path: Path) -> bytes:
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    try:
        return _safetensors_bytes(flat, metadata={"schema": CHECKPOINT_SCHEMA, "step": str(step)})
    except Exception as exc:  # safetensors raises several types (shared storage, bad dtype, ...)
        raise CheckpointError(f"cannot write {path}: {exc}") from None


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model_state: Mapping[str, Tensor],
    config: Mapping[str, Any],
    train_state: Mapping[str, Tensor] | None = None,
    train_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory and return its path.

    model_state: the EMA weights (state-dict keys); config: the resolved configuration holding at
    least ``REQUIRED_CONFIG_KEYS`` ("schema" and provenance "version"/"git_rev" are filled in when
    absent); train_state/train_meta: resume tensors and JSON scalars, both or neither. Saving
    without them deletes a stale train state left in the directory by an earlier save.
    """
    out = Path(directory)
    cfg = {"schema": CHECKPOINT_SCHEMA, **provenance(), **dict(config)}
    if cfg["schema"] != CHECKPOINT_SCHEMA:
        raise CheckpointError(f"config schema {cfg['schema']!r} is not {CHECKPOINT_SCHEMA!r}; leave 'schema' out of the config")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"cannot save checkpoint {out}: config lacks required key(s) {missing}")
    step = cfg["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"cannot save checkpoint {out}: config 'step' must be an integer >= 0, got {step!r}")
    if (train_state is None) != (train_meta is None):
        raise CheckpointError(f"cannot save checkpoint {out}: give train_state and train_meta together, or neither")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"cannot save checkpoint {out}: it exists and is not a directory; choose another output directory")
    fsio.makedirs(str(out), "checkpoint folder")  # a location that cannot take it: one line
    token = uuid.uuid4().hex[:8]
    files = {role: _versioned_name(role, step, token) for role in (["model"] + (["train_state", "train_state_json"] if train_state is not None else []))}
    if train_state is not None:
        meta = {**dict(train_meta), "step": step}
        _atomic_write(out / files["train_state"], _tensor_bytes(train_state, step, out / files["train_state"]))
        _atomic_write(out / files["train_state_json"], _json_bytes(meta, out / files["train_state_json"]))
    _atomic_write(out / files["model"], _tensor_bytes(model_state, step, out / files["model"]))
    cfg["files"] = files
    _atomic_write(out / CONFIG_FILE, _json_bytes(cfg, out / CONFIG_FILE))  # the commit
    _drop_unnamed(out, set(files.values()))
    return out


def _versioned_name(role: str, step: int, token: str) -> str:
    stem, ext = os.path.splitext(_LEGACY_FILES[role])
    return f"{stem}-{step:08d}-{token}{ext}"


def _drop_unnamed(out: Path, keep: set[str]) -> None:
    """Delete checkpoint files (and temporaries of killed saves) that ``config.json`` no longer names."""
    for entry in os.scandir(out):
        if entry.is_file() and entry.name not in keep and _OWN_FILE.match(entry.name):
            Path(entry.path).unlink(missing_ok=True)


def checkpoint_files(directory: str | os.PathLike, config: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """role ("model", and for resume "train_state", "train_state_json") → path of the file the
    last complete save wrote (versioned names from ``config.json``'s ``"files"``, or the fixed
    names of older checkpoints)."""
    directory = Path(directory)
    config = load_checkpoint_config(directory) if config is None else config
    files = config.get("files")
    if files is None:  # written before versioned saves
        return {role: directory / name for role, name in _LEGACY_FILES.items()}
    if not isinstance(files, dict) or not all(isinstance(v, str) and os.path.basename(v) == v for v in files.values()):
        raise CheckpointError(f"{directory / CONFIG_FILE}: 'files' must map roles to file names in the checkpoint directory")
    return {role: directory / name for role, name in files.items()}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {path.parent} a geopipe checkpoint directory?")
    try:
        obj = load_json(str(path), "checkpoint config")  # size, depth and encoding limits: one line
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; the checkpoint is corrupt") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(obj).__name__}")
    return obj


def load_checkpoint_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``config.json`` (schema, required keys); errors name the file. ``"kind"``
    is always set in the result (older checkpoints: :func:`geopipe.schemas.checkpoint.checkpoint_kind`)."""
    path = Path(directory) / CONFIG_FILE
    cfg = _read_json(path)
    if cfg.get("schema") != CHECKPOINT_SCHEMA:
        raise CheckpointError(f"{path}: unsupported schema {cfg.get('schema')!r}; this geopipe reads {CHECKPOINT_SCHEMA!r}")
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in cfg]
    if missing:
        raise CheckpointError(f"{path}: missing required key(s) {missing}; re-save the checkpoint with a complete config")
    if not isinstance(cfg["network"], dict):
        raise CheckpointError(f"{path}: 'network' must be an object, found {type(cfg['network']).__name__}")
    if isinstance(cfg["step"], bool) or not isinstance(cfg["step"], int):
        raise CheckpointError(f"{path}: 'step' must be an integer, found {cfg['step']!r}")
    _check_network(path, cfg)
    cfg["kind"] = checkpoint_kind(cfg)
    if cfg["kind"] not in CHECKPOINT_KINDS or (cfg["kind"] == GENERATIVE) != isinstance(cfg["method"], dict):
        raise CheckpointError(f"{path}: kind {cfg['kind']!r} with method {cfg['method']!r}; expected one of {list(CHECKPOINT_KINDS)} "
                              "(generative: a method object, uncertainty: a method name)")
    return cfg


#: Bounds of the network sizes a checkpoint may declare (checked before anything is allocated).
NETWORK_LIMITS = {"input_dim": 3, "dim": 16384, "depth": 256, "expansion": 64, "cond_dim": 65536}


def _check_network(path: Path, cfg: Mapping[str, Any]) -> None:
    """Refuse network sizes outside :data:`NETWORK_LIMITS` (an edited config must not allocate
    until the machine runs out of memory) and an embedding dimension that disagrees with them."""
    for key, value in cfg["network"].items():
        limit = NETWORK_LIMITS.get(key)
        if limit is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise CheckpointError(f"{path}: network {key} = {value!r} is outside 1..{limit}; the config is damaged or was edited, "
                                  f"restore it or retrain")
    embed_dim, cond_dim = cfg["embed_dim"], cfg["network"].get("cond_dim")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1 or (cond_dim is not None and cond_dim != embed_dim):
        raise CheckpointError(f"{path}: embed_dim {embed_dim!r} must be a positive integer equal to network cond_dim {cond_dim!r}")
    _check_condition(path, cfg.get("condition"), embed_dim)


def _check_condition(path: Path, condition: Any, dim: int) -> None:
    """``condition`` (the embeddings' z-score statistics; absent or null in older checkpoints)
    must hold ``mean`` and ``std``: ``dim`` finite numbers each, every std > 0."""
    if condition is None:
        return
    ok = isinstance(condition, dict)
    for key in ("mean", "std"):
        values = condition.get(key) if ok else None
        ok = ok and isinstance(values, list) and len(values) == dim and all(
            not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or key == "mean") for v in values)
    if not ok:
        raise CheckpointError(f"{path}: condition must hold mean and std, {dim} finite numbers each (std > 0); the config is "
                              "damaged or was edited, restore it or retrain")


def weight_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """name → shape of every tensor of the checkpoint's EMA weights, from the file header only
    (nothing is loaded), to compare a config against its weights before building a model."""
    path = checkpoint_files(directory)["model"]
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {path.parent} a geopipe checkpoint directory?")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {path.parent} a geopipe checkpoint directory?")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except Exception as exc:  # SafetensorError, OSError, ...: anything unreadable is a corrupt file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def _check_step(path: Path, meta: Mapping[str, str], step: int) -> None:
    if meta.get("step") != str(step):
        raise CheckpointError(
            f"{path} holds step {meta.get('step')} but {CONFIG_FILE} says step {step}; "
            "a save was interrupted: re-save or use another checkpoint"
        )


def load_model_weights(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The EMA weights of a checkpoint as a CPU state dict (safetensors only, never unpickled)."""
    config = load_checkpoint_config(directory)
    path = checkpoint_files(directory, config)["model"]
    tensors, meta = _read_tensors(path)
    _check_step(path, meta, config["step"])
    return tensors


def load_train_state(directory: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]] | None:
    """``(tensors, meta)`` for resuming, or None when the checkpoint carries no train state."""
    config = load_checkpoint_config(directory)
    files = checkpoint_files(directory, config)
    tpath, jpath = files.get("train_state"), files.get("train_state_json")
    if tpath is None or jpath is None or (not tpath.exists() and not jpath.exists()):
        return None
    step = config["step"]
    tensors, tmeta = _read_tensors(tpath)
    meta = _read_json(jpath)
    _check_step(tpath, tmeta, step)
    if meta.get("step") != step:
        raise CheckpointError(f"{jpath} holds step {meta.get('step')} but {CONFIG_FILE} says step {step}; a save was interrupted")
    return tensors, meta


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-able tensors and JSON-able scalars.

    Tensors: ``optim.<param id>.<name>`` (moments, per-parameter step) and ``optim.group.<g>.<key>``
    (tensor-valued group entries, e.g. timm Lamb's step). Meta: class name, param groups' scalars
    (lr, betas, ...), non-tensor per-parameter state.
    """
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    state_meta: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{_OPTIM_PREFIX}{pid}.{name}"] = value
            else:
                state_meta.setdefault(str(pid), {})[name] = value
    groups: list[dict[str, Any]] = []
    for gi, group in enumerate(sd["param_groups"]):
        scalars = {}
        for key, value in group.items():
            if torch.is_tensor(value):
                tensors[f"{_OPTIM_PREFIX}group.{gi}.{key}"] = value
            else:
                scalars[key] = list(value) if isinstance(value, tuple) else value
        groups.append(scalars)
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups, "state": state_meta}


def optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Inverse of :func:`optimizer_state_to_tensors`: load the state into ``optimizer`` in place.

    Keys of ``tensors`` outside ``optim.`` are ignored, so a whole train state may be passed.
    """
    if meta.get("class") != type(optimizer).__name__:
        raise CheckpointError(f"saved optimizer is {meta.get('class')!r} but training uses {type(optimizer).__name__!r}; resume with the same optimizer")
    groups = [dict(g) for g in meta["param_groups"]]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"saved optimizer has {len(groups)} parameter groups, the current one {len(optimizer.param_groups)}")
    for saved, current in zip(groups, optimizer.param_groups):
        for key, value in current.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    state: dict[int, dict[str, Any]] = {int(pid): dict(entries) for pid, entries in meta["state"].items()}
    for key, value in tensors.items():
        if not key.startswith(_OPTIM_PREFIX):
            continue
        head, rest = key[len(_OPTIM_PREFIX):].split(".", 1)
        if head == "group":
            gi, gkey = rest.split(".", 1)
            groups[int(gi)][gkey] = value
        else:
            state.setdefault(int(head), {})[rest] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"saved optimizer state does not fit the current model: {exc}") from None


def pack_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, **extra: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(train_state, train_meta) for :func:`save_checkpoint`: raw weights ``model.*``, optimiser
    tensors ``optim.*``; meta ``{"optimizer": ..., **extra}`` (extra: rng seed, best val, ...)."""
    tensors = {f"{_MODEL_PREFIX}{k}": v for k, v in model.state_dict().items()}
    otensors, ometa = optimizer_state_to_tensors(optimizer)
    return {**tensors, **otensors}, {"optimizer": ometa, **extra}


def restore_train_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
    """Load raw weights and optimiser state saved by :func:`pack_train_state` (in place)."""
    weights = {k[len(_MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(_MODEL_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"saved weights do not fit the model: {first}") from None
    optimizer_state_from_tensors(optimizer, tensors, meta["optimizer"])


def checkpoint_identity(directory: str | os.PathLike) -> str:
    """A short hex digest that changes whenever the checkpoint's content may have changed: the
    bytes of ``config.json`` plus (name, size, mtime, inode) of every other file. Retraining
    into the same directory replaces the files (atomic renames), so the identity changes."""
    root = Path(directory)
    h = hashlib.sha256()
    try:
        h.update((root / CONFIG_FILE).read_bytes())
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_file() and entry.name != CONFIG_FILE:
                st = entry.stat()
                h.update(f"{entry.name}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode())
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(directory)!r} ({exc.strerror or exc})") from None
    return h.hexdigest()[:16]

"""Train stage: a generative geolocation model on a store's cached embeddings.

An explicit loop that reads top to bottom: LAMB (or AdamW) with warm-up + cosine decay,
real EMA (docs/methods.md#training), conditioning dropout inside the objective, periodic validation with the EMA
weights, atomic checkpoints {EMA weights, raw weights + optimiser, step, RNG, config}, and
resume that continues bit-identically where an interrupted run stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from geopipe.pipeline.core.device import resolve_device
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.limits import MAX_STEPS
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.conditioning import CondStats
from geopipe.pipeline.model.network import NetworkConfig
from geopipe.pipeline.sphere.geometry import latlon_to_xyz
from geopipe.pipeline.store.format import labelled_rows, nonfinite_records
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.space import store_space
from geopipe.pipeline.store.stream import StoreStream, scan_store
from geopipe.pipeline.train.gallery import (
    build_gallery,
    calibrate_on_store,
    place_field_ids,
    standardize_embedding_part,
    with_neighbours,
)
from geopipe.pipeline.train.loop import LoopConfig, LoopJob, LoopState, TensorBatches, ema_model, run_loop, split_is_val
from geopipe.pipeline.train.optim import EMA, make_optimizer
from geopipe.pipeline.train.resume import resume_run as _resume
from geopipe.pipeline.train.resume import save_run as _save
from geopipe.schemas.checkpoint import CHECKPOINT_SCHEMA, GENERATIVE

__all__ = ["TrainConfig", "TrainResult", "run_train"]

@dataclass(frozen=True)
class TrainConfig:
    """Training options: every default of ``geopipe train`` is stated here (docs/methods.md#training).
    ``depth``, ``lr`` and ``grad_clip`` left None take the method's ``TRAIN_DEFAULTS`` (depth 12,
    lr 8e-4, no clipping; vMF heads 11, 1e-4, 0.05): :func:`run_train` resolves them before
    anything is recorded, so the checkpoint's config.json holds the values that trained."""

    store: str
    out: str
    method: str = "rfm"
    dim: int = 512
    depth: int | None = None
    expansion: int = 4
    location_features: str = "none"  # "rff": multi-scale random Fourier features of the noisy point (field methods)
    schedule: str = "sigmoid"
    schedule_params: dict = field(default_factory=dict)
    cond_drop: float | None = None  # None: 0.1 for generative methods, 0 for vMF baselines
    steps: int = 20000
    batch_size: int = 1024
    lr: float | None = None  # None: 8e-4 generative, 1e-4 vMF
    warmup: int = 500
    weight_decay: float = 0.05
    optimizer: str = "lamb"
    ema_decay: float = 0.999
    grad_clip: float | None = None  # None: none for generative, 0.05 for vMF
    standardize_cond: bool = True  # per-dimension z-scores of the embeddings (geopipe.pipeline.model.conditioning)
    val_fraction: float = 0.05
    val_every: int = 1000
    val_batches: int = 4
    seed: int = 3407
    resume: bool = True
    device: str = "auto"
    progress: bool = True
    stream: bool | None = None  # None: in memory when the store fits comfortably, else streamed from disk
    buffer_chunks: int = 4  # stored chunks per shuffled window when streaming
    allow_changes: bool = False  # resume although the store or training options differ (recorded in config.json "changes")
    neighbours: int = 64  # hybrid: gallery neighbours per record (docs/methods.md#hybrid)
    exclude_km: float = 0.1  # hybrid: a training record's near-duplicates (its own place) are not its neighbours
    place_field: str | None = None  # hybrid: a metadata field of place ids (e.g. the geoclip world's place_id) instead of exclude_km
    val_store: str | None = None  # hybrid: held-out records on which its calibration is fitted (methods/hybrid_calibration.py)
    dropout: float | None = None  # hybrid: dropout on the embedding's projection in training (None: the method's 0.5)

    def __post_init__(self):
        for name in ("steps", "batch_size", "val_every"):
            check_int(getattr(self, name), name, 1, maximum=MAX_STEPS if name == "steps" else None)
        check_int(self.neighbours, "neighbours", 1, maximum=1024)  # hybrid's (recorded in its method options, not "train")
        hybrid_only = [f"--{k.replace('_', '-')}" for k in ("place_field", "val_store", "dropout") if getattr(self, k) is not None]
        if hybrid_only and self.method != "hybrid":
            raise ConfigError(f"{', '.join(hybrid_only)}: options of --method hybrid, not {self.method!r}; leave them out")
        if isinstance(self.exclude_km, bool) or not isinstance(self.exclude_km, (int, float)) or not 0 <= self.exclude_km < 20000:
            raise ConfigError(f"--exclude-km must be a distance in [0, 20000) km, got {self.exclude_km!r}")
        if not 0 <= self.warmup < self.steps:
            raise ConfigError(f"warmup ({self.warmup}) must be smaller than steps ({self.steps}); pass a smaller --warmup")
        if self.location_features not in ("none", "rff"):
            raise ConfigError(f"location_features must be 'none' or 'rff', got {self.location_features!r}")
        if (self.cond_drop is not None and not 0 <= self.cond_drop < 1) or not 0 <= self.val_fraction < 1:
            raise ConfigError("cond_drop and val_fraction must lie in [0, 1)")
        for name, lo, hi in (("lr", 0.0, math.inf), ("weight_decay", 0.0, math.inf), ("ema_decay", 0.0, 1.0), ("grad_clip", 0.0, math.inf)):
            v = getattr(self, name)
            ok = v is None and name in ("lr", "grad_clip") or (
                not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and lo <= v <= hi and (v > 0 or name != "lr"))
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} must be a finite number in {'(' if name == 'lr' else '['}{lo:g}, {hi:g}], "
                                  f"got {v!r}")


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
    n_unlabelled: int = 0  # store rows without a location, skipped


def _fingerprint(store) -> str:
    shards = json.dumps(store.attrs.get("shards", {}), sort_keys=True, default=str)
    return hashlib.sha256(f"{len(store.keys)}|{shards}".encode()).hexdigest()[:16]


#: Left out of config.json's "train" (the hybrid's neighbours and exclude_km are its method options there).
_NOT_RECORDED = ("progress", "device", "buffer_chunks", "neighbours", "exclude_km", "dropout")


def _model_config(cfg: TrainConfig, store, method, net_cfg, stats: CondStats) -> dict:
    return {
        "condition": stats.to_dict(),
        "schema": CHECKPOINT_SCHEMA,
        "kind": GENERATIVE,
        "method": method.to_dict(),
        "network": net_cfg.to_dict(),
        "embed_dim": int(store.embeddings.shape[1]),
        "normalized": bool(store.attrs.get("normalized", True)),
        "backbone": store.attrs.get("backbone", {}),
        "embedding_space": store_space(store),
        "data_fingerprint": _fingerprint(store),
        "train": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_RECORDED
                  and not (k == "location_features" and v == "none")},  # as before the option: old runs resume
        **provenance(),
    }


@dataclass(frozen=True)
class _Data:
    """What training reads from the store: ``batches(step)`` is the batch source from ``step`` on;
    ``val`` the validation (x (m, 3), cond (m, D)) on the device (at most what validation uses);
    n_unlabelled: store rows without a location, in neither split."""

    store: object
    val: tuple
    stats: CondStats
    cond_dim: int
    n_train: int
    n_val: int
    batches: object
    n_unlabelled: int = 0
    gallery: object = None  # hybrid: pipeline.train.gallery.Gallery of the labelled rows
    condition: object = None  # raw batch conditioning → network input (None: stats.apply)


#: The in-memory path needs about this many times the store's bytes (copies while loading).
_IN_MEMORY_FACTOR = 3


def _fits_in_memory(store) -> bool:
    """True when loading the whole store uses under half of the memory available now."""
    import psutil

    row_bytes = store.embed_dim * np.dtype(store.attrs.get("dtype", "float32")).itemsize + 2 * 8 + 3 * 4
    return _IN_MEMORY_FACTOR * store.rows * row_bytes < 0.5 * psutil.virtual_memory().available


def _load_data(cfg: TrainConfig, device, gallery: bool = False) -> _Data:
    """The training split streamed from ``cfg.store`` or loaded whole (``cfg.stream``, None: auto).
    ``gallery`` (hybrid): in memory, with the gallery and each record's neighbour block."""
    if gallery:
        if cfg.stream:
            raise ConfigError("method 'hybrid' trains in memory (its gallery is the whole store): leave out --stream")
        return _memory_data(cfg, device, gallery=True)
    stream = cfg.stream if cfg.stream is not None else not _fits_in_memory(open_store(cfg.store))
    return _stream_data(cfg, device) if stream else _memory_data(cfg, device)


def _no_labelled(cfg: TrainConfig, rows: int) -> GeopipeError:
    return GeopipeError(f"store {cfg.store} has no labelled rows (its {rows} records have no location); train needs "
                        f"geotagged records: extract or import shards whose json/metadata has latitude and longitude")


def _memory_data(cfg: TrainConfig, device, gallery: bool = False) -> _Data:
    store = read_store(cfg.store)
    bad = nonfinite_records(store.keys, store.embeddings, store.latlon)
    if bad:  # found before training: a NaN would only show up as a diverged loss
        raise GeopipeError(f"store {cfg.store}: {bad}; the store is damaged: run `geopipe store verify {cfg.store}`")
    labelled = labelled_rows(store.latlon)
    if not labelled.any():
        raise _no_labelled(cfg, len(labelled))
    n_unlabelled = int((~labelled).sum())
    keys, latlon, emb = (store.keys, store.latlon, store.embeddings) if not n_unlabelled else (
        store.keys[labelled], store.latlon[labelled], store.embeddings[labelled])
    is_val = split_is_val(keys, cfg.val_fraction)
    x_all = latlon_to_xyz(torch.as_tensor(latlon, dtype=torch.float64)).float()
    c_all = torch.as_tensor(emb)  # kept in the store's dtype (float16 halves memory)
    dim, found = int(c_all.shape[1]), None
    if gallery:  # the rows followed by their neighbour blocks (float32)
        found = build_gallery(c_all, x_all)
        c_all = with_neighbours(c_all, found, cfg.neighbours, cfg.exclude_km, places=place_field_ids(store, cfg.place_field, labelled, cfg.store),
                                progress=cfg.progress)
    x_tr, c_tr = x_all[~is_val].to(device), c_all[~is_val].to(device)
    x_va, c_va = x_all[is_val].to(device), c_all[is_val].to(device)
    if len(x_tr) == 0:
        raise GeopipeError(f"store {cfg.store} has no training records")
    stats = CondStats.from_embeddings(emb[~is_val]) if cfg.standardize_cond else CondStats.identity(dim)
    return _Data(store, (x_va, c_va), stats, dim, int(len(x_tr)), int(len(x_va)),
                 lambda step: TensorBatches(x_tr, c_tr, cfg.batch_size), n_unlabelled, found,
                 standardize_embedding_part(stats, dim) if found is not None else None)


def _stream_data(cfg: TrainConfig, device) -> _Data:
    """One pass for the statistics, the split's sizes and the validation rows, then a seeded
    stream that starts at the resumed step (so a resumed run continues the same batches)."""
    store = open_store(cfg.store)
    if store.rows and store.labelled == 0:
        raise _no_labelled(cfg, store.rows)

    def is_train(keys):
        return ~split_is_val(keys, cfg.val_fraction)

    scan = scan_store(cfg.store, is_train, held_out_limit=cfg.val_batches * cfg.batch_size)
    if scan.n == 0:
        raise GeopipeError(f"store {cfg.store} has no training records")
    c_va, ll_va = scan.held_out
    x_va = latlon_to_xyz(torch.as_tensor(ll_va, dtype=torch.float64)).float().to(device)
    stats = CondStats.from_moments(scan.n, scan.sum, scan.sumsq) if cfg.standardize_cond else CondStats.identity(store.embed_dim)
    n_val = store.rows - scan.unlabelled - scan.n

    def batches(step: int) -> StoreStream:
        return StoreStream(cfg.store, cfg.batch_size, seed=cfg.seed, select=is_train, buffer_chunks=cfg.buffer_chunks,
                           start_batch=step, device=device, counts=scan.counts)

    return _Data(store, (x_va, torch.as_tensor(c_va).to(device)), stats, store.embed_dim, scan.n, n_val, batches, scan.unlabelled)


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.method`` on ``cfg.store`` and write the checkpoint directory ``cfg.out``."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    data = _load_data(cfg, device, gallery=cfg.method == "hybrid")
    if data.n_unlabelled:  # never silently: the skipped rows are counted here and in the checkpoint
        print(f"geopipe: train: skipping {data.n_unlabelled} unlabelled rows of {cfg.store} (no location); training on "
              f"{data.n_train + data.n_val} labelled rows ({data.n_train} train, {data.n_val} validation)", file=sys.stderr)
    store, (x_va, c_va), stats = data.store, data.val, data.stats
    own = {} if data.gallery is None else {"neighbours": cfg.neighbours, "exclude_km": cfg.exclude_km, "gallery_rows": len(data.gallery.xyz),
                                           **({} if cfg.dropout is None else {"dropout": cfg.dropout})}
    method = get_method(cfg.method, schedule=cfg.schedule, schedule_params=dict(cfg.schedule_params), cond_drop=cfg.cond_drop, **own)
    defaults = method.TRAIN_DEFAULTS
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})  # recorded as resolved
    net_cfg = NetworkConfig(input_dim=3, dim=cfg.dim, depth=cfg.depth, expansion=cfg.expansion, cond_dim=data.cond_dim,
                            location_features=cfg.location_features)
    torch.manual_seed(cfg.seed)
    model = method.build_model(net_cfg).to(device)
    if data.gallery is not None:
        data.gallery.attach(model)
    params = [p for p in model.parameters() if p.requires_grad]
    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                      batch_size=cfg.batch_size, val_every=cfg.val_every, val_batches=cfg.val_batches, seed=cfg.seed)
    optimizer = make_optimizer(cfg.optimizer, params, lr=loop.lr, weight_decay=cfg.weight_decay) if params else None
    ema = EMA(model, decay=cfg.ema_decay)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    config = _model_config(cfg, store, method, net_cfg, stats)
    config["rows"] = {"labelled": data.n_train + data.n_val, "unlabelled": data.n_unlabelled, "train": data.n_train,
                      "validation": data.n_val}
    step, history = _resume(cfg, model, optimizer, ema, generator, config, defaults) if cfg.resume and optimizer else (0, [])

    def save(state: LoopState) -> None:
        _save(cfg, model, optimizer, ema, generator, config, state.step, state.history)

    batches = data.batches(step)
    try:
        job = LoopJob(method, model, optimizer, ema, batches, (x_va, c_va), data.condition or stats.apply, loop, generator, save,
                      desc=f"train {cfg.method}", progress=cfg.progress)
        state = run_loop(job, LoopState(step=step, history=history))
    finally:
        getattr(batches, "close", lambda: None)()
    if cfg.val_store and method.name == "hybrid":  # held-out calibration, saved with the final weights
        calibrate_on_store(method, ema_model(model, ema), stats, store, cfg.store, cfg.val_store, device)
        config["method"] = method.to_dict()
        save(state)
    return TrainResult(cfg.out, cfg.method, state.step, state.train_loss, state.val_loss, data.n_train, data.n_val,
                       time.perf_counter() - t0, tuple(state.history), data.n_unlabelled)

"""Extract stage: WebDataset shards → Zarr embedding store with a frozen backbone.

Decoding (bytes → PIL → preprocessed tensor) runs in DataLoader workers, each owning whole
shards; the main process embeds batches and commits shards strictly in shard order, so the
store's rows are shard order then tar order whatever ``num_workers`` is. Bad samples are
skipped and recorded in ``STORE/rejects.parquet``; shards already in the store are skipped
(resume); a shard changed since it was extracted is an error unless ``allow_changed``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import GeopipeError
from pipeline.rejects import Reject
from pipeline.shards import ShardStat, resolve_shards, shard_stat
from pipeline.store_writer import DTYPES, StoreWriter, prepare_embeddings
from schemas.rejects import REJECT_REASONS
from schemas.store import REJECTS_FILE

__all__ = ["ExtractConfig", "ExtractResult", "TooManyRejectsError", "ShardChangedError", "run_extract"]

#: Samples a run must have seen before the reject fraction can fail it early (before the end).
_EARLY_FAIL_MIN_SAMPLES = 1000


class TooManyRejectsError(GeopipeError):
    """The fraction of rejected samples exceeded ``max_reject_fraction``."""


class ShardChangedError(GeopipeError):
    """A shard's size or mtime differs from when it was extracted into the store."""


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``geopipe extract``.

    shards: paths, globs or brace patterns. meta_fields: json fields to carry into
    ``meta/<name>`` (None: every scalar field). dtype: stored embedding dtype. normalize:
    L2-normalise embeddings. max_reject_fraction: fail when rejected / seen exceeds it.
    allow_changed: keep (not re-extract) shards whose file changed since extraction
    instead of failing.
    """

    shards: tuple[str, ...]
    store: str
    backbone: str = "tiny"
    pretrained: str | None = None
    batch_size: int = 256
    num_workers: int = 2
    lat_key: str = "latitude"
    lon_key: str = "longitude"
    meta_fields: tuple[str, ...] | None = None
    dtype: str = "float16"
    normalize: bool = True
    device: str = "auto"
    max_reject_fraction: float = 0.5
    allow_changed: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", (self.shards,) if isinstance(self.shards, str) else tuple(self.shards))
        if not self.shards:
            raise ValueError("extract needs at least one shard path or pattern")
        if not isinstance(self.store, str) or not self.store:
            raise ValueError("extract needs a store path")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown embedding dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if not 0.0 <= float(self.max_reject_fraction) <= 1.0:
            raise ValueError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction!r}")
        if self.meta_fields is not None:
            from pipeline.store import META_NAME

            object.__setattr__(self, "meta_fields", tuple(self.meta_fields))
            bad = [m for m in self.meta_fields if not META_NAME.match(m) or m in (self.lat_key, self.lon_key)]
            if bad:
                raise ValueError(f"invalid meta field names {bad}: use letters, digits, '_', '-', '.', not the coordinates")


@dataclass(frozen=True)
class ExtractResult:
    """What a run did: rows added and rejects (this run), shards extracted/skipped/changed.

    seconds: wall time of the whole stage (backbone loading included); images_per_s:
    samples (ok + rejected) per second of the decode/embed/write loop.
    """

    store: str
    n_ok: int
    n_rejected: int
    rejects_by_reason: dict = field(default_factory=dict)
    shards_done: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    shards_changed: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for humans: counts, rejects by reason, throughput."""
        why = ", ".join(f"{r}: {c}" for r, c in self.rejects_by_reason.items())
        return (f"extract → {self.store}: {self.n_ok} ok, {self.n_rejected} rejected" + (f" ({why})" if why else "")
                + f"; {self.shards_done} shards extracted, {self.shards_skipped} already done; "
                f"{self.images_per_s:.1f} images/s, {self.seconds:.1f} s")


class _Run:
    """Counters of one run and the reject-fraction policy."""

    def __init__(self, cfg: ExtractConfig):
        self.cfg, self.ok, self.reasons, self.shards = cfg, 0, Counter(), 0

    def add(self, n_ok: int, rejects: list[Reject]) -> None:
        self.ok += n_ok
        self.reasons.update(r.reason for r in rejects)
        self.shards += 1

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def check(self, final: bool, store: StoreWriter | None = None) -> None:
        """Raise TooManyRejectsError when rejected / seen > max_reject_fraction: early (this run,
        once enough samples were seen) or final (over the whole store, so that a retried or
        resumed run cannot hide the rejects of the shards committed before it)."""
        ok, reasons = (store.rows, Counter(store.attrs["rejects"])) if store is not None else (self.ok, self.reasons)
        rejected = sum(reasons.values())
        seen = ok + rejected
        if not seen or (not final and seen < _EARLY_FAIL_MIN_SAMPLES):
            return
        if rejected / seen > self.cfg.max_reject_fraction:
            why = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
            raise TooManyRejectsError(
                f"too many rejects: {rejected} of {seen} samples ({rejected / seen:.0%}) exceed "
                f"max_reject_fraction={self.cfg.max_reject_fraction} ({why}); see "
                f"{os.path.join(self.cfg.store, REJECTS_FILE)}"
            )


def _plan(urls: list[str], writer: StoreWriter, allow_changed: bool):
    """→ (todo [(url, stat)], n_skipped, changed urls); raises ShardChangedError."""
    todo, skipped, changed = [], 0, []
    for url in urls:
        stat = shard_stat(url)
        rec = writer.shards.get(url)
        if rec is None:
            todo.append((url, stat))
            continue
        skipped += 1
        if (rec["size"], rec["mtime"]) != (stat.size, stat.mtime):
            changed.append(url)
            if not allow_changed:
                raise ShardChangedError(
                    f"shard {url} changed since it was extracted into {writer.path} (size {rec['size']} → {stat.size}, "
                    f"mtime {rec['mtime']} → {stat.mtime}); extract into a new store, or allow_changed to keep the old rows"
                )
    return todo, skipped, tuple(changed)


def _load_backbone(cfg: ExtractConfig, device):
    from pipeline.backbones import BackboneLoadError, BackboneSpec, UnknownBackboneError, load_backbone

    try:
        return load_backbone(BackboneSpec(cfg.backbone, cfg.pretrained), device=device)
    except (UnknownBackboneError, BackboneLoadError) as exc:
        raise GeopipeError(str(exc)) from exc


def run_extract(cfg: ExtractConfig, *, backbone=None) -> ExtractResult:
    """Extract ``cfg.shards`` into ``cfg.store`` (created, or appended to / resumed).

    backbone: an already loaded :class:`pipeline.backbones.Backbone` to use instead of
    loading ``cfg.backbone`` (tests, notebooks extracting several stores). Raises
    GeopipeError subclasses for user errors (missing shard, locked store, backbone
    mismatch, changed shard, too many rejects).
    """
    from pipeline.device import resolve_device
    from pipeline.provenance import provenance

    t0 = time.perf_counter()
    urls = resolve_shards(cfg.shards)
    existed = os.path.exists(cfg.store)
    lock = StoreWriter.lock(cfg.store)  # fail fast, before loading a backbone
    try:
        try:
            device = resolve_device(cfg.device)
        except ValueError as exc:
            raise GeopipeError(str(exc)) from None
        if backbone is not None:
            bb, device = backbone, backbone.device
        else:
            bb = _load_backbone(cfg, device)
        created_by = {**provenance(), "config": dataclasses.asdict(cfg)}
        writer = StoreWriter.open(cfg.store, backbone=bb.identity, embed_dim=bb.embed_dim, dtype=cfg.dtype,
                                  normalize=cfg.normalize, created_by=created_by, lock=lock)
    except BaseException:
        lock.release()
        if not existed and os.path.isdir(cfg.store) and not os.listdir(cfg.store):
            os.rmdir(cfg.store)
        raise
    run = _Run(cfg)
    with writer:
        todo, skipped, changed = _plan(urls, writer, cfg.allow_changed)
        t_loop = time.perf_counter()
        if todo:
            _extract_shards(todo, writer, bb, cfg, device, run)
        t_loop = time.perf_counter() - t_loop
    seen = run.ok + run.rejected
    result = ExtractResult(cfg.store, run.ok, run.rejected, {r: run.reasons[r] for r in REJECT_REASONS if run.reasons[r]},
                           run.shards, skipped, time.perf_counter() - t0, seen / t_loop if t_loop > 0 else 0.0, changed)
    if cfg.progress:
        print(result.summary(), file=sys.stderr)
    run.check(final=True, store=writer)
    return result


# --------------------------------------------------------------------------- the loop


def _identity(x):
    return x


def _extract_shards(todo, writer: StoreWriter, bb, cfg: ExtractConfig, device, run: _Run) -> None:
    import torch
    from tqdm import tqdm

    from pipeline.shard_loader import SampleSpec, ShardBatches

    spec = SampleSpec(cfg.lat_key, cfg.lon_key, cfg.meta_fields)
    dataset = ShardBatches([u for u, _ in todo], bb.preprocess, spec, cfg.batch_size)
    workers = min(cfg.num_workers, len(todo))
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                         pin_memory=torch.device(device).type == "cuda")
    total_bytes, bytes_done = sum(s.size for _, s in todo), 0
    bar = tqdm(desc="extract", unit="img", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
    pending: dict[int, list] = {}  # shard position → [(seq, part, embeddings)] until its last part
    done, nxt = set(), 0
    try:
        for part in loader:
            images = part.pop("images")  # not buffered: a shard's decoded images can be gigabytes
            emb = bb.encode(images).cpu().numpy() if images is not None else np.zeros((0, bb.embed_dim), np.float32)
            pending.setdefault(part["shard"], []).append((part["seq"], part, emb))
            done.update([part["shard"]] if part["last"] else [])
            bar.update(part["n_samples"])
            while nxt in done:
                url, stat = todo[nxt]
                n_ok, rejects = _commit(writer, url, stat, pending.pop(nxt), cfg)
                run.add(n_ok, rejects)
                bytes_done += stat.size
                if bytes_done and total_bytes:  # ETA from the shards' bytes per image so far
                    bar.total = max(bar.n, int(bar.n * total_bytes / bytes_done))
                    bar.refresh()
                nxt += 1
                run.check(final=False)
    finally:
        bar.close()


def _commit(writer: StoreWriter, url: str, stat: ShardStat, parts: list, cfg: ExtractConfig):
    """Assemble a finished shard in tar order, reject bad embeddings and duplicate keys, append it."""
    parts = sorted(parts, key=lambda p: p[0])
    idx = [i for _, p, _ in parts for i in p["idx"]]
    keys = [k for _, p, _ in parts for k in p["keys"]]
    latlon = [ll for _, p, _ in parts for ll in p["latlon"]]
    meta = [m for _, p, _ in parts for m in p["meta"]]
    emb = np.concatenate([e for _, _, e in parts], axis=0)
    rejects = [r for _, p, _ in parts for r in p["rejects"]]
    _, finite = prepare_embeddings(emb, cfg.dtype, cfg.normalize)
    keep, seen = [], set()
    for row, key in enumerate(keys):
        if not finite[row]:
            rejects.append((idx[row], Reject(key, url, "invalid_embedding", "backbone output is non-finite, zero or overflows the dtype")))
        elif key in writer.keys_seen or key in seen:
            where = "in the store" if key in writer.keys_seen else "earlier in this shard"
            rejects.append((idx[row], Reject(key, url, "duplicate_key", f"key already {where}; first occurrence kept")))
        else:
            seen.add(key)
            keep.append(row)
    rejects = [r for _, r in sorted(rejects, key=lambda t: t[0])]
    fields = list(dict.fromkeys(name for row in keep for name in meta[row]))
    columns = {name: [meta[row].get(name, "") for row in keep] for name in fields}
    coords = np.asarray([latlon[r] for r in keep], dtype=np.float64).reshape(-1, 2)
    writer.append_shard(url, emb[keep], coords, [keys[r] for r in keep], columns, rejects, stat)
    return len(keep), rejects

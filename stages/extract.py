"""Extract stage: WebDataset shards → Zarr embedding store with a frozen backbone.

Decoding runs in DataLoader workers and shards are committed strictly in shard order
(:mod:`geopipe.pipeline.ingest.embed`), so the store's rows are shard order then tar order whatever
``num_workers`` is. Bad samples are skipped and recorded in ``STORE/rejects.parquet``.

Runs are resumable and incremental (:mod:`geopipe.pipeline.ingest.plan`): shards already in the store
are skipped, new ones appended; shards changed since they were written are handled by
``on_changed`` ("error" | "skip" | "reextract"), and shards in the store that the patterns no
longer match are reported (``shards_missing``). With ``embedding_key`` the shards' own
``.npy`` embeddings are stored and no backbone is loaded; ``backbone`` is then only the label
recorded as the store's backbone identity. Shards and store may be fsspec urls.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.ingest.backbones import PRECISIONS
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.ingest.plan import ON_CHANGED, RejectBudget, ShardChangedError, TooManyRejectsError, plan_shards
from geopipe.pipeline.ingest.shards import resolve_shards
from geopipe.pipeline.store.writer import DTYPES, StoreWriter
from geopipe.schemas.rejects import REJECT_REASONS
from geopipe.schemas.store import REJECTS_FILE
from geopipe.stages.ingest_result import IngestResult

__all__ = ["ExtractConfig", "ExtractResult", "TooManyRejectsError", "ShardChangedError", "run_extract"]

def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``geopipe extract``.

    shards: paths, globs, brace patterns or fsspec urls; store: path or fsspec url.
    meta_fields: json fields to carry into ``meta/<name>`` (None: every scalar field).
    dtype: stored embedding dtype; normalize: L2-normalise embeddings. precision: autocast of
    the forward pass ("auto" = bf16/fp16 on CUDA, fp32 on CPU; "fp32", "bf16", "fp16").
    max_reject_fraction: fail when rejected / seen exceeds it. on_changed: what to do with
    shards whose file changed since they were written ("error", "skip": keep the old rows,
    "reextract": truncate the store at the first changed shard and extract from there again).
    verify_hash: compare the sha256 of already-written shards' bytes (reads them in full)
    instead of their mtime. embedding_key: sample extension holding a precomputed embedding
    (e.g. "street_clip.npy") to store instead of running a backbone.
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
    precision: str = "auto"
    max_reject_fraction: float = 0.5
    on_changed: str = "error"
    verify_hash: bool = False
    embedding_key: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", (self.shards,) if isinstance(self.shards, str) else tuple(self.shards))
        if not self.shards:
            raise ConfigError("extract needs at least one shard path or pattern")
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError("extract needs a store path")
        _positive_int("batch_size", self.batch_size, 1)
        _positive_int("num_workers", self.num_workers, 0)
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown embedding dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.on_changed not in ON_CHANGED:
            raise ConfigError(f"unknown on_changed policy {self.on_changed!r}; choose one of {list(ON_CHANGED)}")
        if not 0.0 <= float(self.max_reject_fraction) <= 1.0:
            raise ConfigError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction!r}")
        if self.embedding_key is not None and (self.pretrained is not None or not self.embedding_key.strip(".")):
            raise ConfigError("embedding_key stores precomputed embeddings: give a sample extension such as "
                             "'street_clip.npy', a backbone label and no pretrained weights")
        if self.meta_fields is not None:
            from geopipe.pipeline.store.reader import META_NAME

            object.__setattr__(self, "meta_fields", tuple(self.meta_fields))
            bad = [m for m in self.meta_fields if not META_NAME.match(m) or m in (self.lat_key, self.lon_key)]
            if bad:
                raise ConfigError(f"invalid meta field names {bad}: use letters, digits, '_', '-', '.', not the coordinates")


@dataclass(frozen=True)
class ExtractResult(IngestResult):
    """What an extract run did (see :class:`IngestResult`); changed shards were handled per
    ``on_changed``. images_per_s: samples (ok + rejected) per second of the decode/embed/write
    loop; ``seconds`` includes backbone loading.
    """

    images_per_s: float = 0.0
    on_changed: str = "error"

    VERB = "extract"

    def _changed_how(self) -> str:
        return "re-extracted" if self.on_changed == "reextract" else "old rows kept"

    def _throughput(self) -> str:
        return f"{self.images_per_s:.1f} images/s"


def _load_backbone(cfg: ExtractConfig, device):
    from geopipe.pipeline.ingest.backbones import BackboneLoadError, BackboneSpec, UnknownBackboneError, load_backbone

    try:
        return load_backbone(BackboneSpec(cfg.backbone, cfg.pretrained), device=device)
    except (UnknownBackboneError, BackboneLoadError) as exc:
        raise GeopipeError(str(exc)) from exc


def _source(cfg: ExtractConfig, urls: list[str], store: str, device, backbone):
    """→ (backbone or None, identity dict, embed_dim) for the run."""
    if cfg.embedding_key is None:
        bb = backbone if backbone is not None else _load_backbone(cfg, device)
        return bb, bb.identity, bb.embed_dim
    from geopipe.pipeline.ingest.pairs import precomputed_identity
    from geopipe.pipeline.ingest.decode import find_embed_dim
    from geopipe.pipeline.store.reader import open_store

    if fsio.isfile(fsio.join(store, "zarr.json")):
        dim = open_store(store).embed_dim  # samples of another width are rejected, not the run
    else:
        dim = find_embed_dim(urls, cfg.embedding_key)
    return None, precomputed_identity(cfg.backbone, dim), dim


def _open_writer(cfg: ExtractConfig, urls: list[str], store: str, backbone):
    """Lock the store (fail fast), resolve the device and backbone, open the writer."""
    from geopipe.pipeline.core.device import resolve_device
    from geopipe.pipeline.core.provenance import provenance

    existed = fsio.exists(store)
    lock = StoreWriter.lock(store)
    try:
        try:
            device = resolve_device(cfg.device)
        except ValueError as exc:
            raise GeopipeError(str(exc)) from None
        bb, identity, dim = _source(cfg, urls, store, device, backbone)
        device = bb.device if bb is not None else device
        created_by = {**provenance(), "config": dataclasses.asdict(cfg)}
        writer = StoreWriter.open(store, backbone=identity, embed_dim=dim, dtype=cfg.dtype, normalize=cfg.normalize,
                                  created_by=created_by, lock=lock)
    except BaseException:
        lock.release()
        if not existed and fsio.is_local(store) and os.path.isdir(store) and not os.listdir(store):
            os.rmdir(store)
        raise
    return writer, bb, device


def run_extract(cfg: ExtractConfig, *, backbone=None) -> ExtractResult:
    """Extract ``cfg.shards`` into ``cfg.store`` (created, or appended to / resumed).

    backbone: an already loaded :class:`geopipe.pipeline.ingest.backbones.Backbone` to use instead of
    loading ``cfg.backbone`` (tests, notebooks extracting several stores). Raises
    GeopipeError subclasses for user errors (missing shard, locked store, backbone
    mismatch, changed shard, too many rejects).
    """
    from geopipe.pipeline.ingest.embed import LoopOptions, embed_shards
    from geopipe.pipeline.ingest.decode import SampleSpec

    t0 = time.perf_counter()
    urls = resolve_shards(cfg.shards)
    store = fsio.normalize(cfg.store)
    writer, bb, device = _open_writer(cfg, urls, store, backbone)
    budget = RejectBudget(cfg.max_reject_fraction, fsio.join(store, REJECTS_FILE))

    def on_commit(url, n_ok, rejects) -> None:
        budget.add(n_ok, [r.reason for r in rejects])
        budget.check(final=False)

    with writer:
        plan = plan_shards(urls, writer.shards, store=cfg.store, on_changed=cfg.on_changed, verify_hash=cfg.verify_hash)
        if plan.truncate_at is not None:
            writer.truncate(plan.truncate_at)
        t_loop = time.perf_counter()
        if plan.todo:
            spec = SampleSpec(cfg.lat_key, cfg.lon_key, cfg.meta_fields, cfg.embedding_key)
            opts = LoopOptions(cfg.batch_size, cfg.num_workers, cfg.precision, progress=cfg.progress)
            embed_shards(plan.todo, writer, bb, spec, opts, device, on_commit)
        t_loop = time.perf_counter() - t_loop
    seen = budget.ok + budget.rejected
    result = ExtractResult(
        cfg.store, budget.ok, budget.rejected, {r: budget.reasons[r] for r in REJECT_REASONS if budget.reasons[r]},
        budget.shards, len(plan.skipped), time.perf_counter() - t0, plan.changed, plan.missing,
        images_per_s=seen / t_loop if t_loop > 0 else 0.0, on_changed=cfg.on_changed,
    )
    if cfg.progress:
        print(result.summary(), file=sys.stderr)
    budget.check(final=True, rows=writer.rows, store_rejects=writer.attrs["rejects"])
    return result

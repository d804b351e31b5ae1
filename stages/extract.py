"""Extract stage: WebDataset shards and image files → Zarr embedding store with a frozen backbone.

Inputs are tars, image files, folders (walked recursively) and globs of them
(:mod:`geopipe.pipeline.ingest.sources`): a folder's photos are read as sources of at most
``images_per_source`` files, labelled by sidecar json and/or EXIF GPS (``labels``) or left
unlabelled; each source is one completion record like a tar, so everything below holds for them.

Decoding runs in DataLoader workers and shards are committed strictly in shard order
(:mod:`geopipe.pipeline.ingest.embed`), so the store's rows are shard order then tar order whatever
``num_workers`` is. Bad samples are skipped and recorded in ``STORE/rejects/rejects.parquet``.

Runs are resumable and incremental (:mod:`geopipe.pipeline.ingest.plan`): shards already in the store
are skipped, new ones appended; shards changed since they were written are handled by
``on_changed`` ("error" | "skip" | "reextract"), and shards in the store that the patterns no
longer match are reported (``shards_missing``). With ``embedding_key`` the shards' own
``.npy`` embeddings are stored and no backbone is loaded; ``backbone`` is then only the label
recorded as the store's backbone identity. Shards and store may be fsspec urls.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.limits import MAX_IMAGE_PIXELS, MAX_MEMBER_BYTES
from geopipe.pipeline.core.parallel import parse_dask_spec
from geopipe.pipeline.ingest.images import LABELS
from geopipe.pipeline.ingest.plan import ShardChangedError, TooManyRejectsError
from geopipe.pipeline.ingest.run import IngestOptions, IngestResult, check_ingest_options, meta_names, run_ingest
from geopipe.pipeline.ingest.sources import PER_SOURCE
from geopipe.pipeline.vision.backbones import PRECISIONS

__all__ = ["ExtractConfig", "ExtractResult", "TooManyRejectsError", "ShardChangedError", "run_extract"]

@dataclass(frozen=True)
class ExtractConfig:
    """Options of ``geopipe extract``.

    shards: the inputs — WebDataset tars, image files, folders, globs, brace patterns, fsspec urls
    (:mod:`geopipe.pipeline.ingest.sources`); store: path or fsspec url. labels: how image files
    are labelled — "auto" (a sidecar ``<stem>.json`` beside the image, else its EXIF GPS, else
    unlabelled), "sidecar", "exif", or "none" (never read labels: blind geolocation); tar samples
    keep their json. images_per_source: most image files per source (store record; the unit of
    resume and of Dask fan-out).
    meta_fields: json fields to carry into ``meta/<name>`` (None: every scalar field).
    dtype: stored embedding dtype; normalize: L2-normalise embeddings. precision: autocast of
    the forward pass ("auto" = bf16/fp16 on CUDA, fp32 on CPU; "fp32", "bf16", "fp16").
    max_reject_fraction: fail when rejected / seen exceeds it. on_changed: what to do with
    shards whose file changed since they were written ("error", "skip": keep the old rows,
    "reextract": truncate the store at the first changed shard and extract from there again).
    verify_hash: compare the sha256 of already-written shards' bytes (reads them in full)
    instead of their mtime. embedding_key: sample extension holding a precomputed embedding
    (e.g. "street_clip.npy") to store instead of running a backbone. dask: None (this process),
    "local:N" (a LocalCluster of N workers; with several GPUs worker i uses GPU i mod count) or a
    scheduler address: workers embed whole shards into fragments under ``STORE/.staging`` and
    this process commits them in order (:mod:`geopipe.pipeline.ingest.distributed`); the store
    equals a single-process run's. Workers decode in a thread beside the backbone (a Dask worker
    starts no processes), so ``num_workers`` applies to the single-process run only.
    max_member_mb: largest tar member read, MiB decompressed (from its header; a bigger one is a
    ``member_too_large`` reject, skipped unread); max_image_pixels: largest image decoded,
    width × height (a bigger one is an ``image_too_large`` reject) — :mod:`geopipe.pipeline.core.limits`.
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
    dask: str | None = None
    labels: str = "auto"
    images_per_source: int = PER_SOURCE
    max_member_mb: int = MAX_MEMBER_BYTES >> 20
    max_image_pixels: int = MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", (self.shards,) if isinstance(self.shards, str) else tuple(self.shards))
        if not self.shards:
            raise ConfigError("extract needs at least one shard path or pattern")
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError("extract needs a store path")
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.num_workers, "num_workers", 0)
        check_int(self.images_per_source, "images_per_source", 1)
        check_int(self.max_member_mb, "max_member_mb", 1)
        check_int(self.max_image_pixels, "max_image_pixels", 1)
        if self.labels not in LABELS:
            raise ConfigError(f"unknown labels {self.labels!r}; choose one of {list(LABELS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        check_ingest_options(self.dtype, self.max_reject_fraction, self.on_changed)
        if self.embedding_key is not None and (self.pretrained is not None or not self.embedding_key.strip(".")):
            raise ConfigError("embedding_key stores precomputed embeddings: give a sample extension such as "
                             "'street_clip.npy', a backbone label and no pretrained weights")
        object.__setattr__(self, "meta_fields", meta_names(self.meta_fields, reserved=(self.lat_key, self.lon_key)))
        if self.dask:
            parse_dask_spec(self.dask)  # local:0, malformed addresses: refused before anything starts


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
    from geopipe.pipeline.vision.backbones import BackboneLoadError, BackboneSpec, UnknownBackboneError, load_backbone

    try:
        return load_backbone(BackboneSpec(cfg.backbone, cfg.pretrained), device=device)
    except (UnknownBackboneError, BackboneLoadError) as exc:
        raise GeopipeError(str(exc)) from exc


def _source(cfg: ExtractConfig, urls: list[str], store: str, device, backbone):
    """→ (backbone or None, identity dict, embed_dim) for the run."""
    if cfg.embedding_key is None:
        bb = backbone if backbone is not None else _load_backbone(cfg, device)
        return bb, bb.identity, bb.embed_dim
    from geopipe.pipeline.ingest.decode import find_embed_dim
    from geopipe.pipeline.ingest.pairs import precomputed_identity
    from geopipe.pipeline.store.reader import open_store

    if fsio.isfile(fsio.join(store, "zarr.json")):
        dim = open_store(store).embed_dim  # samples of another width are rejected, not the run
    else:
        dim = find_embed_dim(urls, cfg.embedding_key)
    return None, precomputed_identity(cfg.backbone, dim), dim


def run_extract(cfg: ExtractConfig, *, backbone=None) -> ExtractResult:
    """Extract ``cfg.shards`` into ``cfg.store`` (created, or appended to / resumed).

    backbone: an already loaded :class:`geopipe.pipeline.vision.backbones.Backbone` to use instead of
    loading ``cfg.backbone`` (tests, notebooks extracting several stores; with ``cfg.dask`` the
    workers load their own). Raises
    GeopipeError subclasses for user errors (missing shard, locked store, backbone
    mismatch, changed shard, too many rejects).
    """
    from geopipe.pipeline.core.device import resolve_device
    from geopipe.pipeline.ingest.embed import LoopOptions, embed_shards

    t0 = time.perf_counter()
    inputs = _inputs(cfg)
    store = fsio.normalize(cfg.store)
    if cfg.dask:
        return _run_distributed(cfg, inputs, store, t0)

    def prepare():
        device = resolve_device(cfg.device)
        bb, identity, dim = _source(cfg, inputs.urls(), store, device, backbone)
        return identity, dim, (bb, bb.device if bb is not None else device)

    def write(writer, todo, ctx, on_commit):
        bb, device = ctx
        spec = _spec(cfg)
        opts = LoopOptions(cfg.batch_size, cfg.num_workers, cfg.precision, progress=cfg.progress)
        reader = inputs.reader([u for u, _ in todo], cfg.lat_key, cfg.lon_key, spec.max_member_bytes)
        embed_shards(todo, writer, bb, spec, opts, device, on_commit, samples=reader)

    return run_ingest(_given(inputs, store), cfg.store, _ingest_options(cfg), prepare=prepare, write=write, t0=t0,
                      stat_fn=inputs.stat, hash_fn=inputs.sha256, same_source=_same_source(cfg, backbone),
                      on_done=functools.partial(_clean_staging, store),
                      finish=lambda common, per_s: ExtractResult(**common, images_per_s=per_s, on_changed=cfg.on_changed))


def _spec(cfg: ExtractConfig):
    """The samples' decoding options (:class:`geopipe.pipeline.ingest.decode.SampleSpec`)."""
    from geopipe.pipeline.ingest.decode import SampleSpec

    return SampleSpec(cfg.lat_key, cfg.lon_key, cfg.meta_fields, cfg.embedding_key, cfg.max_member_mb << 20, cfg.max_image_pixels)


def _inputs(cfg: ExtractConfig):
    """The scanned inputs (:class:`geopipe.pipeline.ingest.sources.Inputs`); precomputed
    embeddings (``embedding_key``) come from tars only."""
    from geopipe.pipeline.ingest.sources import resolve_inputs

    inputs = resolve_inputs(cfg.shards, labels=cfg.labels, per_source=cfg.images_per_source)
    if cfg.embedding_key is not None and inputs.n_images:
        raise ConfigError(f"embedding_key reads precomputed embeddings from WebDataset tars, but the inputs hold "
                          f"{inputs.n_images} image files; extract those with a backbone (no --embedding-key)")
    return inputs


def _given(inputs, store: str):
    """records → the run's sources: files a store already holds stay in their recorded source."""
    from geopipe.pipeline.ingest.sources import store_members

    return lambda records: inputs.urls(records, store_members(store, records))


def _same_source(cfg: ExtractConfig, backbone=None):
    """Whether a store's recorded backbone identity is ``cfg``'s source (``backbone``'s identity
    when one is given), by name and tag alone (a rerun with nothing new then loads no backbone;
    any doubt takes the full path, which says what differs)."""
    def same(recorded: dict) -> bool:
        if backbone is not None:
            return recorded == backbone.identity
        imported = (recorded.get("preprocess") or {}).get("source") == "import"
        return (recorded.get("name") == cfg.backbone and recorded.get("pretrained") == cfg.pretrained
                and imported == (cfg.embedding_key is not None))
    return same


def _ingest_options(cfg: ExtractConfig) -> IngestOptions:
    from geopipe.pipeline.core.provenance import provenance

    return IngestOptions(cfg.dtype, cfg.normalize, cfg.max_reject_fraction, cfg.on_changed, cfg.verify_hash, cfg.progress,
                         created_by={**provenance(), "config": dataclasses.asdict(cfg)})


def _clean_staging(store: str) -> None:
    """Once every shard is committed (store still locked): fragments a killed ``--dask`` run left are stale."""
    from geopipe.pipeline.ingest.distributed import remove_staging

    remove_staging(store)


def _run_distributed(cfg: ExtractConfig, inputs, store: str, t0: float) -> ExtractResult:
    """:func:`run_extract` with Dask workers embedding the shards (``cfg.dask``)."""
    import contextlib

    from geopipe.pipeline.core.parallel import dask_client
    from geopipe.pipeline.ingest.distributed import StageJob, embed_distributed, worker_identity

    job = StageJob(cfg.backbone, cfg.pretrained, _spec(cfg), cfg.batch_size, cfg.precision, cfg.device, labels=cfg.labels)
    with contextlib.ExitStack() as stack:
        def prepare():  # the store is locked: start the cluster, ask a worker for the backbone's identity
            client = stack.enter_context(dask_client(cfg.dask))
            if cfg.embedding_key is not None:
                _, identity, dim = _source(cfg, inputs.urls(), store, None, None)
                return identity, dim, client
            from geopipe.pipeline.vision.backbones import BackboneLoadError, UnknownBackboneError

            try:
                identity, dim = client.submit(worker_identity, job, pure=False).result()
            except (UnknownBackboneError, BackboneLoadError) as exc:
                raise GeopipeError(str(exc)) from exc
            return identity, dim, client

        def write(writer, todo, client, on_commit):
            images = {u: inputs.image_source(u) for u, _ in todo if inputs.image_source(u) is not None}
            embed_distributed(todo, writer, job, client, on_commit, progress=cfg.progress, images=images)

        return run_ingest(_given(inputs, store), cfg.store, _ingest_options(cfg), prepare=prepare, write=write, t0=t0,
                          stat_fn=inputs.stat, hash_fn=inputs.sha256, same_source=_same_source(cfg),
                          on_done=functools.partial(_clean_staging, store),
                          finish=lambda common, per_s: ExtractResult(**common, images_per_s=per_s, on_changed=cfg.on_changed))

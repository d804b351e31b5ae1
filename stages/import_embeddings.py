"""Import stage: precomputed embeddings (clip-retrieval folders, ``.npy``/Parquet pairs) → store.

The same store format, validation and rejects as ``geopipe extract``
(:mod:`geopipe.pipeline.ingest.pairs` reads the pairs, :mod:`geopipe.pipeline.ingest.rows` filters and appends):
rows with invalid or missing coordinates, a missing key, an unusable embedding or a repeated
key are skipped and recorded in ``STORE/rejects.parquet``. Each pair is one "shard" with a
completion record, so an interrupted import resumes and a later import with more pairs
appends only the new ones (``on_changed`` and ``shards_missing`` as for extract). A pair
whose files disagree on the row count is an error, and nothing of it is written. The store's
backbone identity is the user's label (``backbone_name``), e.g. "StreetCLIP".
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.ingest.pairs import (ColumnSpec, EmbeddingPair, discover_pairs, npy_embed_dim, pair_sha256, pair_stat,
                                precomputed_identity, read_pair)
from geopipe.pipeline.ingest.plan import ON_CHANGED, RejectBudget, plan_shards
from geopipe.pipeline.ingest.rows import commit_rows
from geopipe.pipeline.store.writer import DTYPES, StoreWriter
from geopipe.schemas.rejects import REJECT_REASONS
from geopipe.schemas.store import REJECTS_FILE
from geopipe.stages.ingest_result import IngestResult
from geopipe.pipeline.core.errors import ConfigError

__all__ = ["ImportConfig", "ImportResult", "run_import"]


@dataclass(frozen=True)
class ImportConfig:
    """Options of ``geopipe import``.

    sources: clip-retrieval folders (``img_emb/`` + ``metadata/``) or ``.npy`` paths/globs
    with ``.parquet`` partners. backbone_name: label of the model that made the embeddings
    (recorded as the store's backbone identity; appending needs the same label). key_col,
    lat_col, lon_col: metadata columns (degrees); meta_fields: extra columns to carry (None:
    every scalar column). dtype, normalize, max_reject_fraction, on_changed, verify_hash: as
    for extract.
    """

    sources: tuple[str, ...]
    store: str
    backbone_name: str
    key_col: str = "key"
    lat_col: str = "latitude"
    lon_col: str = "longitude"
    meta_fields: tuple[str, ...] | None = None
    dtype: str = "float16"
    normalize: bool = True
    max_reject_fraction: float = 0.5
    on_changed: str = "error"
    verify_hash: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", (self.sources,) if isinstance(self.sources, str) else tuple(self.sources))
        if not self.sources:
            raise ConfigError("import needs at least one source folder or .npy path")
        if not isinstance(self.store, str) or not self.store:
            raise ConfigError("import needs a store path")
        if not isinstance(self.backbone_name, str) or not self.backbone_name.strip():
            raise ConfigError("import needs a backbone name labelling the embeddings' model (e.g. 'StreetCLIP')")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown embedding dtype {self.dtype!r}; choose one of {list(DTYPES)}")
        if self.on_changed not in ON_CHANGED:
            raise ConfigError(f"unknown on_changed policy {self.on_changed!r}; choose one of {list(ON_CHANGED)}")
        if not 0.0 <= float(self.max_reject_fraction) <= 1.0:
            raise ConfigError(f"max_reject_fraction must be in [0, 1], got {self.max_reject_fraction!r}")
        if self.meta_fields is not None:
            from geopipe.pipeline.store.reader import META_NAME

            object.__setattr__(self, "meta_fields", tuple(self.meta_fields))
            bad = [m for m in self.meta_fields if not META_NAME.match(m)]
            if bad:
                raise ConfigError(f"invalid meta column names {bad}: use letters, digits, '_', '-', '.'")


@dataclass(frozen=True)
class ImportResult(IngestResult):
    """What an import run did (see :class:`IngestResult`); its unit is an embedding pair."""

    rows_per_s: float = 0.0

    VERB = "import"
    UNIT = "pairs"

    def _throughput(self) -> str:
        return f"{self.rows_per_s:.0f} rows/s"


def _open_writer(cfg: ImportConfig, store: str, pairs: list[EmbeddingPair]) -> StoreWriter:
    from geopipe.pipeline.core.provenance import provenance
    from geopipe.pipeline.store.reader import open_store

    lock = StoreWriter.lock(store)
    try:
        exists = fsio.isfile(fsio.join(store, "zarr.json"))
        dim = open_store(store).embed_dim if exists else npy_embed_dim(pairs[0].embeddings)
        created_by = {**provenance(), "config": dataclasses.asdict(cfg)}
        return StoreWriter.open(store, backbone=precomputed_identity(cfg.backbone_name, dim), embed_dim=dim,
                                dtype=cfg.dtype, normalize=cfg.normalize, created_by=created_by, lock=lock)
    except BaseException:
        lock.release()
        raise


def run_import(cfg: ImportConfig) -> ImportResult:
    """Import ``cfg.sources`` into ``cfg.store`` (created, or appended to / resumed).

    Raises GeopipeError subclasses for user errors (no pairs, misaligned pair, missing column,
    locked store, other backbone label or embedding width, changed pair, too many rejects).
    """
    t0 = time.perf_counter()
    pairs = {p.url: p for p in discover_pairs(cfg.sources)}
    store = fsio.normalize(cfg.store)
    writer = _open_writer(cfg, store, list(pairs.values()))
    budget = RejectBudget(cfg.max_reject_fraction, fsio.join(store, REJECTS_FILE))
    cols = ColumnSpec(cfg.key_col, cfg.lat_col, cfg.lon_col, cfg.meta_fields)
    with writer:
        plan = plan_shards(list(pairs), writer.shards, store=cfg.store, on_changed=cfg.on_changed,
                           verify_hash=cfg.verify_hash, stat_fn=lambda u: pair_stat(pairs[u]),
                           hash_fn=lambda u: pair_sha256(pairs[u]))
        if plan.truncate_at is not None:
            writer.truncate(plan.truncate_at)
        t_loop = time.perf_counter()
        with Progress(len(plan.todo), "import", "pair", enabled=cfg.progress) as bar:
            for url, stat in plan.todo:
                rows = read_pair(pairs[url], cols, writer.attrs["embed_dim"])
                stat = dataclasses.replace(stat, sha256=pair_sha256(pairs[url]))
                n_ok, rejects = commit_rows(writer, url, stat, rows)
                budget.add(n_ok, [r.reason for r in rejects])
                budget.check(final=False)
                bar.set_postfix(rows=budget.ok, rejected=budget.rejected)
                bar.update(1)
        t_loop = time.perf_counter() - t_loop
    seen = budget.ok + budget.rejected
    result = ImportResult(
        cfg.store, budget.ok, budget.rejected, {r: budget.reasons[r] for r in REJECT_REASONS if budget.reasons[r]},
        budget.shards, len(plan.skipped), time.perf_counter() - t0, plan.changed, plan.missing,
        rows_per_s=seen / t_loop if t_loop > 0 else 0.0,
    )
    if cfg.progress:
        print(result.summary(), file=sys.stderr)
    budget.check(final=True, rows=writer.rows, store_rejects=writer.attrs["rejects"])
    return result

"""Import stage: precomputed embeddings (clip-retrieval folders, ``.npy``/Parquet pairs) → store.

The same store format, validation and rejects as ``geopipe extract``
(:mod:`geopipe.pipeline.ingest.pairs` reads, filters and appends the pairs a block of rows at a time):
rows with invalid coordinates (or one without the other), a missing key, an unusable embedding
or a repeated key are skipped and recorded in ``STORE/rejects/rejects.parquet``; rows with
neither coordinate (both null, or neither column in the file) are kept as unlabelled records
(latlon NaN, counted in the summary). Each pair is one "shard" with a
completion record, so an interrupted import resumes and a later import with more pairs
appends only the new ones (``on_changed`` and ``shards_missing`` as for extract). A pair
whose files disagree on the row count is an error, and nothing of it is written. The store's
backbone identity is the user's label (``backbone_name``), e.g. "StreetCLIP".
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.ingest.pairs import ColumnSpec, commit_pair, discover_pairs, npy_embed_dim, pair_sha256, pair_stat, precomputed_identity
from geopipe.pipeline.ingest.run import IngestOptions, IngestResult, check_ingest_options, meta_names, run_ingest

__all__ = ["ImportConfig", "ImportResult", "run_import"]


@dataclass(frozen=True)
class ImportConfig:
    """Options of ``geopipe import``.

    sources: clip-retrieval folders (``img_emb/`` + ``metadata/``) or ``.npy`` paths/globs
    with ``.parquet`` partners. backbone_name: label of the model that made the embeddings
    (recorded as the store's backbone identity; appending needs the same label). key_col,
    lat_col, lon_col: metadata columns (degrees; a file with neither coordinate column holds
    unlabelled rows); meta_fields: extra columns to carry (None:
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
        check_ingest_options(self.dtype, self.max_reject_fraction, self.on_changed)
        object.__setattr__(self, "meta_fields", meta_names(self.meta_fields, what="meta column"))


@dataclass(frozen=True)
class ImportResult(IngestResult):
    """What an import run did (see :class:`IngestResult`); its unit is an embedding pair."""

    rows_per_s: float = 0.0

    VERB = "import"
    UNIT = "pairs"

    def _throughput(self) -> str:
        return f"{self.rows_per_s:.0f} rows/s"


def run_import(cfg: ImportConfig) -> ImportResult:
    """Import ``cfg.sources`` into ``cfg.store`` (created, or appended to / resumed).

    Raises GeopipeError subclasses for user errors (no pairs, misaligned pair, missing column,
    locked store, other backbone label or embedding width, changed pair, too many rejects).
    """
    from geopipe.pipeline.core.provenance import provenance
    from geopipe.pipeline.store.reader import open_store

    t0 = time.perf_counter()
    pairs = {p.url: p for p in discover_pairs(cfg.sources)}
    store = fsio.normalize(cfg.store)
    cols = ColumnSpec(cfg.key_col, cfg.lat_col, cfg.lon_col, cfg.meta_fields)

    def prepare():
        exists = fsio.isfile(fsio.join(store, "zarr.json"))
        dim = open_store(store).embed_dim if exists else npy_embed_dim(next(iter(pairs.values())).embeddings)
        return precomputed_identity(cfg.backbone_name, dim), dim, None

    def write(writer, todo, _ctx, on_commit):
        rows_ok = rejected = 0
        with Progress(len(todo), "import", "pair", enabled=cfg.progress) as bar:
            for url, stat in todo:
                stat = dataclasses.replace(stat, sha256=pair_sha256(pairs[url]))
                n_ok, rejects = commit_pair(writer, pairs[url], cols, stat)  # a block of rows in memory at a time
                on_commit(url, n_ok, rejects)
                rows_ok, rejected = rows_ok + n_ok, rejected + len(rejects)
                bar.set_postfix(rows=rows_ok, rejected=rejected)
                bar.update(1)

    opts = IngestOptions(cfg.dtype, cfg.normalize, cfg.max_reject_fraction, cfg.on_changed, cfg.verify_hash, cfg.progress,
                         created_by={**provenance(), "config": dataclasses.asdict(cfg)})
    return run_ingest(list(pairs), cfg.store, opts, prepare=prepare, write=write, t0=t0,
                      stat_fn=lambda u: pair_stat(pairs[u]), hash_fn=lambda u: pair_sha256(pairs[u]),
                      finish=lambda common, per_s: ImportResult(**common, rows_per_s=per_s))

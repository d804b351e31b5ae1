"""Zarr v3 embedding store layout (schema ``geopipe.store/1``).

A store is a Zarr v3 group::

    STORE/
      embeddings   (N, D) float16|float32   chunked by rows, zstd-compressed
      latlon       (N, 2) float64           (latitude, longitude) in degrees, wrapped (§1.1)
      keys         (N,)   string            WebDataset ``__key__``; unique within a store
      shard        (N,)   int32             index into ``attrs["shards"]`` order (insertion order)
      meta/<name>  (N,)   string            extra json fields carried from the shards
                                            (JSON-encoded scalars; "" when absent)
      rejects/part-<index>.parquet          rejects of the shard with that record index
      rejects.parquet                       all rejects (see :mod:`geopipe.schemas.rejects`),
                                            consolidated from the parts when a writer closes

Rows are appended shard by shard; a shard's rows are contiguous. A shard counts as
extracted only once its completion record is in ``attrs["shards"]`` (written after the
arrays are resized and filled), so a crash mid-shard leaves rows past ``attrs["rows"]``
that a resumed run overwrites.

A store may live on a local disk or behind an fsspec url (``s3://bucket/x.zarr``,
``memory://x.zarr``); a "shard" is a WebDataset tar for ``geopipe extract`` and an
embeddings/metadata file pair for ``geopipe import``.
"""

from __future__ import annotations

__all__ = [
    "STORE_SCHEMA",
    "ARRAY_EMBEDDINGS",
    "ARRAY_LATLON",
    "ARRAY_KEYS",
    "ARRAY_SHARD",
    "META_GROUP",
    "REJECTS_FILE",
    "REQUIRED_ATTRS",
    "SHARD_RECORD_FIELDS",
    "SHARD_RECORD_OPTIONAL",
    "validate_store_attrs",
]

STORE_SCHEMA = "geopipe.store/1"

ARRAY_EMBEDDINGS = "embeddings"
ARRAY_LATLON = "latlon"
ARRAY_KEYS = "keys"
ARRAY_SHARD = "shard"
META_GROUP = "meta"
REJECTS_FILE = "rejects.parquet"

#: Group attributes every store carries, with their JSON type.
REQUIRED_ATTRS: dict[str, type] = {
    "schema": str,  # == STORE_SCHEMA
    "rows": int,  # committed rows (arrays may be longer after a crash)
    "embed_dim": int,
    "dtype": str,  # "float16" | "float32"
    "normalized": bool,  # embeddings L2-normalised per row
    "backbone": dict,  # {"name", "pretrained", "embed_dim", "preprocess": {...}, "fingerprint"}
    "shards": dict,  # shard url -> completion record (SHARD_RECORD_FIELDS)
    "rejects": dict,  # reason -> count, over all completed shards
    "meta_fields": list,  # names of arrays under meta/
    "created_by": dict,  # {"version", "git_rev", "config"}
}

#: Fields of one shard's completion record in ``attrs["shards"][url]``.
SHARD_RECORD_FIELDS: tuple[str, ...] = (
    "index",  # int, value used in the ``shard`` array
    "start",  # first row (inclusive)
    "stop",  # last row (exclusive)
    "n_ok",
    "n_rejected",
    "size",  # bytes of the shard file when extracted (change detection)
    "mtime",  # float seconds, or null for remote files without one
)

#: Optional fields of a completion record (absent in stores written before they existed).
SHARD_RECORD_OPTIONAL: tuple[str, ...] = (
    "digest",  # sha256 hex over the shard's keys, stored embedding bytes and latlon bytes
    "sha256",  # sha256 hex of the shard file's bytes (content change detection), or null
)


def validate_store_attrs(attrs: dict) -> list[str]:
    """Return a list of human-readable problems with a store's attributes (empty = valid)."""
    problems: list[str] = []
    for name, kind in REQUIRED_ATTRS.items():
        if name not in attrs:
            problems.append(f"missing attribute {name!r}")
        elif kind is int and isinstance(attrs[name], bool):
            problems.append(f"attribute {name!r} must be {kind.__name__}")
        elif not isinstance(attrs[name], kind):
            problems.append(f"attribute {name!r} must be {kind.__name__}, got {type(attrs[name]).__name__}")
    if attrs.get("schema") not in (None, STORE_SCHEMA):
        problems.append(f"unsupported store schema {attrs.get('schema')!r}; expected {STORE_SCHEMA!r}")
    for url, rec in (attrs.get("shards") or {}).items():
        missing = [f for f in SHARD_RECORD_FIELDS if f not in rec]
        if missing:
            problems.append(f"shard record {url!r} lacks {missing}")
    return problems

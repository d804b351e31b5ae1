"""Zarr v3 embedding store layout (schema ``geopipe.store/1``).

A store is a Zarr v3 group::

    STORE/
      embeddings   (N, D) float16|float32   dims (record, dim); chunked by rows, zstd-compressed
      latlon       (N, 2) float64           dims (record, coord): (latitude, longitude) in degrees,
                                            wrapped to [-90, 90] × [-180, 180); (NaN, NaN) for an
                                            unlabelled record (no location known)
      coord        (2,)   string            dims (coord,): the labels "lat", "lon"
      keys         (N,)   string            dims (record,): WebDataset ``__key__``; unique within a store
      shard        (N,)   int32             dims (record,): index into ``attrs["shards"]`` order
      meta/keys    (N,)   string            the keys again, so that ``meta`` has its ``keys`` coordinate
                                            (stores written before it lack it; a store whose json
                                            carried a field named "keys" keeps that field there)
      meta/<name>  (N,)                     dims (record,): extra json fields carried from the
                                            shards, stored by the array attribute ``encoding``
                                            (:data:`META_ENCODINGS`), decided from the field's first values:
                                            "string": string, the strings themselves ("" absent);
                                            "number" / "integer": float64, the JSON numbers (NaN
                                            absent; "integer" fields read back as JSON integers);
                                            "json": string, JSON-encoded scalars ("" absent) — the
                                            field's values are not all strings or all numbers;
                                            stores from before the attribute: always "json"
      meta/<name>~json (N,) string          only beside a "number"/"integer" field some of whose later
                                            values are not numbers (listed in ``attrs["meta_text"]``):
                                            their JSON text ("" on every other row)
      rejects      () string                an array node holding no data (its value reads
                                            "rejects.parquet"); its folder holds the Parquet files
                                            (see :mod:`geopipe.schemas.rejects`), which Zarr never lists:
        part-<index>.parquet                rejects of the shard with that record index
        rejects.parquet                     all rejects, consolidated from the parts

Every array carries ``dimension_names`` and CF-style attributes (:data:`ARRAY_ATTRS`:
``long_name``, ``units``; ``coordinates = "keys"`` so xarray shows the keys as a coordinate),
and its chunks end in a crc32c checksum (codec ``crc32c``, after compression), so any Zarr
reader refuses a damaged chunk. The root ``zarr.json`` holds consolidated metadata of every
node, rewritten with each commit (:data:`CONSOLIDATED`), so ``xarray.open_zarr(STORE)`` opens the
store (``group="meta"`` for the meta fields) with one read and no warning. Stores written
before these existed lack them and are read as before (a writer or ``geopipe store repair``
adds the consolidated metadata and turns a ``rejects`` group into the array node; rejects in a
``rejects`` group, or ``rejects.parquet`` at the root, are older layouts).

**Unlabelled records.** A record without a location (a sample whose json has neither
coordinate, or no json; an imported row whose coordinates are both null or absent) is stored
with ``latlon = (NaN, NaN)``: its embedding is as valid as any other, so ``predict`` can
geolocate it, while ``train`` and the scores of ``evaluate`` use labelled rows only. Any other
non-finite ``latlon`` (one NaN, an infinity) is damage. The group attribute ``labelled``
(:data:`LABELLED_ATTR`) counts the rows with a location, kept by the writer with each shard's
completion record (whose ``labelled`` field counts that shard's); stores written before it lack
both and count the rows with finite ``latlon`` (every row of such a store, whose writer refused
non-finite coordinates).

Rows are appended shard by shard; a shard's rows are contiguous. A shard counts as
extracted only once its completion record is in ``attrs["shards"]`` (written after the
arrays are resized and filled), so a crash mid-shard leaves rows past ``attrs["rows"]``
that a resumed run overwrites. **Rows rule:** the store is rows ``[0, attrs["rows"])``; a
writer trims every array to exactly that many rows when it opens and after dropping shards, so
arrays are longer only while a writer runs or after one was interrupted — readers that do not use geopipe
should cut at ``attrs["rows"]`` (``ds.isel(record=slice(0, ds.attrs["rows"]))``).

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
    "ARRAY_COORD",
    "COORD_LABELS",
    "DIMENSIONS",
    "META_DIMENSIONS",
    "ARRAY_ATTRS",
    "REJECTS_GROUP",
    "REJECTS_FILE",
    "LEGACY_REJECTS_FILE",
    "META_ENCODING_ATTR",
    "META_ENCODINGS",
    "META_KEYS",
    "META_TEXT_SUFFIX",
    "META_TEXT_ATTR",
    "REJECTS_NODE_VALUE",
    "CONSOLIDATED",
    "MAX_ATTR_BYTES",
    "REQUIRED_ATTRS",
    "SHARD_RECORD_FIELDS",
    "SHARD_RECORD_OPTIONAL",
    "CHUNK_DIGESTS_ATTR",
    "LABELLED_ATTR",
    "validate_store_attrs",
    "EMBEDDING_SPACE_FIELDS",
]

STORE_SCHEMA = "geopipe.store/1"

ARRAY_EMBEDDINGS = "embeddings"
ARRAY_LATLON = "latlon"
ARRAY_KEYS = "keys"
ARRAY_SHARD = "shard"
META_GROUP = "meta"
ARRAY_COORD = "coord"
COORD_LABELS = ("lat", "lon")
REJECTS_GROUP = "rejects"
REJECTS_FILE = "rejects/rejects.parquet"
LEGACY_REJECTS_FILE = "rejects.parquet"  # where stores written before the rejects group kept it
META_ENCODING_ATTR = "encoding"  # of a meta/<name> array, one of META_ENCODINGS (absent: "json")
#: Stored encodings of a meta field: strings, JSON texts, float64 numbers, float64 integers.
META_ENCODINGS: tuple[str, ...] = ("string", "json", "number", "integer")
META_KEYS = "keys"  # meta/keys: the keys coordinate of the meta group (not a field)
META_TEXT_SUFFIX = "~json"  # meta/<name>~json: JSON text of a numeric field's values that are not numbers
#: Optional group attribute: names of the numeric meta fields that have a ``meta/<name>~json`` array.
META_TEXT_ATTR = "meta_text"
REJECTS_NODE_VALUE = "rejects.parquet"  # what the rejects array node reads as (its fill value)
#: The root zarr.json carries consolidated metadata (``consolidated_metadata``, zarr-python's
#: inline kind) of every array and group, current after each commit.
CONSOLIDATED = "consolidated_metadata"
#: Most bytes (JSON) of the group attributes that do not grow with the store (all but ``shards``,
#: ``chunk_digests``, ``rejects``, ``meta_fields``, ``meta_text``): settings and identities, not data.
MAX_ATTR_BYTES = 1 << 20

#: ``dimension_names`` of each array (what xarray names the axes).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    ARRAY_EMBEDDINGS: ("record", "dim"),
    ARRAY_LATLON: ("record", "coord"),
    ARRAY_COORD: ("coord",),
    ARRAY_KEYS: ("record",),
    ARRAY_SHARD: ("record",),
}
META_DIMENSIONS: tuple[str, ...] = ("record",)

#: CF-style attributes of each array (``units`` "1": dimensionless).
ARRAY_ATTRS: dict[str, dict] = {
    ARRAY_EMBEDDINGS: {"long_name": "image embedding of the backbone (attrs: backbone, normalized)", "units": "1",
                       "coordinates": "keys"},
    ARRAY_LATLON: {"long_name": "photo location, WGS 84 latitude and longitude", "units": "degrees",
                   "coord_units": ["degrees_north", "degrees_east"], "coordinates": "keys"},
    ARRAY_COORD: {"long_name": "columns of latlon: latitude, longitude"},
    ARRAY_KEYS: {"long_name": "record key (WebDataset __key__), unique in the store"},
    ARRAY_SHARD: {"long_name": "index of the record's shard in the completion records", "units": "1", "coordinates": "keys"},
}

#: Fields of an embedding-space record (checkpoint config.json "embedding_space"; derived from a store's
#: "backbone", "embed_dim" and "normalized" attrs): two artefacts hold comparable embeddings only when
#: these agree (geopipe.pipeline.store.space.check_same_space is the rule).
EMBEDDING_SPACE_FIELDS: tuple[str, ...] = ("name", "pretrained", "fingerprint", "preprocess", "embed_dim", "normalized")

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
    "rejects_digest",  # 16 hex of sha256 of the shard's rejects part file (when it has rejects)
    "labelled",  # int, rows of the shard with a location (the others are unlabelled: latlon NaN)
)

#: Optional group attribute (stores written before it existed lack it): array path → chunk key
#: ("c/0/0") → 16 hex of sha256 of the chunk's encoded bytes, committed with each shard
#: (:mod:`geopipe.pipeline.store.chunks`).
CHUNK_DIGESTS_ATTR = "chunk_digests"

#: Optional group attribute (stores written before it existed lack it): int, committed rows with a
#: location (finite latlon); ``rows − labelled`` rows are unlabelled (latlon NaN, NaN).
LABELLED_ATTR = "labelled"


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
    labelled, rows = attrs.get(LABELLED_ATTR), attrs.get("rows")
    if labelled is not None and (isinstance(labelled, bool) or not isinstance(labelled, int)
                                 or (isinstance(rows, int) and not 0 <= labelled <= rows)):
        problems.append(f"attribute {LABELLED_ATTR!r} must be an int in [0, rows], got {labelled!r}")
    text = attrs.get(META_TEXT_ATTR)
    if text is not None and (not isinstance(text, list) or not set(text) <= set(attrs.get("meta_fields") or [])):
        problems.append(f"attribute {META_TEXT_ATTR!r} must list meta fields, got {text!r}")
    for url, rec in (attrs.get("shards") or {}).items():
        missing = [f for f in SHARD_RECORD_FIELDS if f not in rec]
        if missing:
            problems.append(f"shard record {url!r} lacks {missing}")
    return problems

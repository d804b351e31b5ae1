"""Precomputed embeddings: pairs of an (N, D) ``.npy`` file and an N-row Parquet metadata file.

Two layouts are discovered by :func:`discover_pairs`:

* clip-retrieval output folders: ``DIR/img_emb/img_emb_<i>.npy`` with
  ``DIR/metadata/metadata_<i>.parquet``, paired by the integer ``<i>``;
* plain pairs: ``X.npy`` with ``X.parquet`` beside it, given as paths, globs or brace patterns
  of the ``.npy`` files.

Row r of the metadata describes row r of the embeddings: a key column, latitude and longitude
in degrees, and extra columns carried into the store's ``meta/`` (JSON-encoded; null = absent).
A row whose latitude and longitude are both null — or a file without either column — is an
*unlabelled record*, stored with latlon (NaN, NaN) (schemas/store.py); one null coordinate
beside a given one is a ``missing_coordinates`` reject, a file with one of the two columns a
:class:`PairError` (a misnamed column, not a data problem).
Each pair becomes one "shard" of a store (its url is the ``.npy`` url), so imports are
resumable and incremental exactly like extraction. Files may be local or fsspec urls.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.ingest.rows import NpyRows, PairError, ParquetRows
from geopipe.pipeline.ingest.shards import file_sha256, resolve_shards, shard_stat
from geopipe.pipeline.sphere.geometry import LAT_LIMIT, LON_LIMIT, coordinate_problem
from geopipe.pipeline.store.format import ShardStat, meta_encoding, usable_embeddings
from geopipe.pipeline.store.reader import META_NAME
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["PairError", "EmbeddingPair", "ColumnSpec", "NpyRows", "precomputed_identity", "discover_pairs", "pair_stat",
           "pair_sha256", "npy_embed_dim", "commit_pair"]

_EMB = re.compile(r"^img_emb_(\d+)\.npy$")
_META = re.compile(r"^metadata_(\d+)\.parquet$")


@dataclass(frozen=True)
class EmbeddingPair:
    """embeddings: url of the (N, D) ``.npy``; metadata: url of the N-row ``.parquet``."""

    embeddings: str
    metadata: str

    @property
    def url(self) -> str:
        """The pair's name in the store's completion records."""
        return self.embeddings


@dataclass(frozen=True)
class ColumnSpec:
    """Metadata columns: key, latitude and longitude (degrees), and the extra columns to carry
    (None: every scalar column whose name is a valid array name)."""

    key_col: str = "key"
    lat_col: str = "latitude"
    lon_col: str = "longitude"
    meta_fields: tuple[str, ...] | None = None


def precomputed_identity(label: str, embed_dim: int) -> dict:
    """Backbone identity of embeddings computed elsewhere, named by the user's ``label``."""
    if not isinstance(label, str) or not label.strip():
        raise ConfigError("precomputed embeddings need a backbone label naming their model (e.g. 'StreetCLIP')")
    return {"name": label, "pretrained": None, "embed_dim": int(embed_dim), "preprocess": {"source": "import"},
            "fingerprint": hashlib.sha256(label.encode()).hexdigest()}


def _clip_retrieval_pairs(folder: str) -> list[EmbeddingPair]:
    emb_dir, meta_dir = fsio.join(folder, "img_emb"), fsio.join(folder, "metadata")
    embs = {int(m.group(1)): n for n in fsio.listdir(emb_dir) if (m := _EMB.match(n))}
    metas = {int(m.group(1)): n for n in fsio.listdir(meta_dir) if (m := _META.match(n))}
    if not embs:
        raise PairError(f"{folder} is not a clip-retrieval folder (no img_emb/img_emb_<i>.npy files); "
                        f"pass the folder holding img_emb/ and metadata/, or .npy files with .parquet partners")
    for i in sorted(set(embs) ^ set(metas)):
        have, lack = ("img_emb", f"metadata/metadata_{i}.parquet") if i in embs else ("metadata", f"img_emb/img_emb_{i}.npy")
        raise PairError(f"{folder}: {have} file {i} has no partner {lack}; every pair needs both files")
    return [EmbeddingPair(fsio.join(emb_dir, embs[i]), fsio.join(meta_dir, metas[i])) for i in sorted(embs)]


def discover_pairs(sources: Sequence[str]) -> list[EmbeddingPair]:
    """Expand ``sources`` (clip-retrieval folders; ``.npy`` paths, globs, brace patterns) into pairs.

    Order: sources in order, pairs by index / pattern order; repeats kept once. Raises
    PairError for a ``.npy`` without its ``.parquet`` and ShardNotFoundError for no match.
    """
    pairs: dict[str, EmbeddingPair] = {}
    for src in [sources] if isinstance(sources, str) else sources:
        src = fsio.normalize(src)
        if src.rstrip("/").endswith(".npy") or any(c in src for c in "*?[{"):
            found = []
            for npy in resolve_shards([src]):
                meta = npy[: -len(".npy")] + ".parquet"
                if not npy.endswith(".npy") or not fsio.isfile(meta):
                    raise PairError(f"{npy} has no metadata partner {meta}; each X.npy needs an X.parquet beside it")
                found.append(EmbeddingPair(npy, meta))
        else:
            found = _clip_retrieval_pairs(src.rstrip("/"))
        pairs.update({p.url: p for p in found if p.url not in pairs})
    return list(pairs.values())


def pair_stat(pair: EmbeddingPair) -> ShardStat:
    """Size (sum of both files) and mtime (the later one; None if either has none)."""
    a, b = shard_stat(pair.embeddings), shard_stat(pair.metadata)
    mtime = max(a.mtime, b.mtime) if a.mtime is not None and b.mtime is not None else None
    return ShardStat(a.size + b.size, mtime)


def pair_sha256(pair: EmbeddingPair) -> str:
    """sha256 hex over the two files' sha256 hex digests (content change detection)."""
    return hashlib.sha256((file_sha256(pair.embeddings) + file_sha256(pair.metadata)).encode()).hexdigest()


def npy_embed_dim(url: str) -> int:
    """Width D of an (N, D) ``.npy`` (reads the header only)."""
    arr = NpyRows(url)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise PairError(f"{url}: expected an (N, D) numeric array of embeddings, got {arr.shape} {arr.dtype}")
    return int(arr.shape[1])


def _meta_columns(schema, cols: ColumnSpec, url: str) -> list[str]:
    import pyarrow.types as pt

    skip = {cols.key_col, cols.lat_col, cols.lon_col}
    if cols.meta_fields is not None:
        absent = [m for m in cols.meta_fields if m not in schema.names]
        if absent:
            raise PairError(f"{url}: columns {absent} not found; it has {schema.names}")
        return [m for m in cols.meta_fields if m not in skip]
    scalar = (pt.is_string, pt.is_large_string, pt.is_integer, pt.is_floating, pt.is_boolean, pt.is_temporal,
              pt.is_decimal, pt.is_dictionary)
    return [f.name for f in schema if f.name not in skip and META_NAME.match(f.name)
            and any(check(f.type) for check in scalar)]


def _coordinate(value, name: str, limit: float) -> tuple[float | None, str, str]:
    """→ (value or None, reject reason, detail)."""
    problem = coordinate_problem(value, name, limit)
    return (None, *problem) if problem is not None else (float(value), "", "")


def commit_pair(writer: StoreWriter, pair: EmbeddingPair, cols: ColumnSpec, stat: ShardStat) -> tuple[int, list[Reject]]:
    """Append a pair as shard ``pair.url`` of ``writer``'s store: rows with a usable key, coordinates
    and embedding whose key is new; rejects for the others. Returns (rows kept, rejects in row order).

    Both files are read a block (``writer.block_rows`` rows) at a time, twice: a first pass
    decides the kept rows and the meta fields (holding keys and coordinates, not metadata), the
    writer's pass reads them again. Raises PairError, before anything is written, for misaligned
    row counts, a missing column, or embeddings that are not (N, the store's width).
    """
    emb, table, dim = NpyRows(pair.embeddings), ParquetRows(pair.metadata), writer.attrs["embed_dim"]
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or emb.shape[1] != dim:
        raise PairError(f"{pair.embeddings}: expected (N, {dim}) numeric embeddings, got {emb.shape} {emb.dtype}")
    if emb.shape[0] != table.num_rows:
        raise PairError(f"pair misaligned: {pair.embeddings} has {emb.shape[0]} embeddings but {pair.metadata} has "
                        f"{table.num_rows} rows; row r of both files must describe the same image")
    absent = [c for c in (cols.key_col, cols.lat_col, cols.lon_col) if c not in table.schema.names]
    if absent and absent != [cols.lat_col, cols.lon_col]:  # neither coordinate column: every row is unlabelled
        raise PairError(f"{pair.metadata}: columns {absent} not found; it has {table.schema.names} "
                        f"(choose the key/latitude/longitude columns; a file of unlabelled rows has neither coordinate column)")
    names = _meta_columns(table.schema, cols, pair.metadata)
    kept, keys, latlon, rejects, first, stringy, seen = [], [], [], [], {}, dict.fromkeys(names, True), set()
    read = [c for c in (cols.key_col, cols.lat_col, cols.lon_col) if c not in absent]
    try:
        for start, batch in table.batches([*read, *names], writer.block_rows):
            usable = usable_embeddings(emb[start:start + batch.num_rows], writer.attrs["dtype"], writer.attrs["normalized"])
            here, lls = [], []
            for i, key, ll, reject in _candidates(batch, cols, pair.url, start):
                if reject is not None:
                    rejects.append(reject)
                elif not usable[i - start]:
                    detail = f"embedding is non-finite, zero or overflows {writer.attrs['dtype']}"
                    rejects.append(Reject(key, pair.url, "invalid_embedding", detail))
                elif key in writer.keys_seen or key in seen:
                    where = "in the store" if key in writer.keys_seen else "earlier in this shard"
                    rejects.append(Reject(key, pair.url, "duplicate_key", f"key already {where}; first occurrence kept"))
                else:
                    seen.add(key)
                    here.append(i - start)
                    keys.append(key)
                    lls.append(ll)
            here = np.asarray(here, dtype=np.int64)
            _field_stats(batch, names, here, len(keys) - len(here), first, stringy)
            kept.append(start + here)  # numpy per batch: 8 + 16 bytes a kept row, not Python objects
            latlon.append(np.asarray(lls, dtype=np.float64).reshape(-1, 2))
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise PairError(f"{pair.metadata}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
    fields = sorted(first, key=lambda n: (first[n], names.index(n)))  # first-appearance order, as rows would list them
    index, latlon = np.concatenate([np.zeros(0, np.int64), *kept]), np.concatenate([np.zeros((0, 2)), *latlon])
    meta = table.rows(index, fields, lambda column: ["" if v is None else v for v in _json_texts(column)], writer.block_rows)
    writer.append_shard(pair.url, emb if len(index) == emb.shape[0] else emb.select(index),
                        latlon, keys, meta, rejects, stat,
                        meta_encodings={n: "string" if stringy[n] else "json" for n in fields})
    return len(keys), rejects


def _candidates(batch, cols: ColumnSpec, url: str, start: int):
    """(row, key, (lat, lon), None) for rows of ``batch`` (file rows from ``start``) with a key and
    usable coordinates — (NaN, NaN) for an unlabelled row, both null or both columns absent;
    (row, key, None, Reject) for the others: the exact rule and message of every ingest."""
    keys = ["" if k is None else str(k) for k in batch.column(cols.key_col).to_pylist()]
    if cols.lat_col not in batch.column_names:  # neither column (commit_pair refuses one alone)
        for j, key in enumerate(keys):
            reject = None if key else Reject("", url, "missing_key", f"row {start + j}: {cols.key_col} is null or empty")
            yield start + j, key, None if reject else (math.nan, math.nan), reject
        return
    lat, lon = _degrees(batch, cols.lat_col), _degrees(batch, cols.lon_col)
    with np.errstate(invalid="ignore"):
        fine = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= LAT_LIMIT) & (np.abs(lon) <= LON_LIMIT)
    for j, key in enumerate(keys):
        i = start + j
        if key and fine[j]:
            yield i, key, (float(lat[j]), float(lon[j])), None
            continue
        values = batch.column(cols.lat_col)[j].as_py(), batch.column(cols.lon_col)[j].as_py()
        lon_i, (lat_i, why, detail) = None, _coordinate(values[0], cols.lat_col, LAT_LIMIT)
        if lat_i is not None:
            lon_i, why, detail = _coordinate(values[1], cols.lon_col, LON_LIMIT)
        if not key:
            yield i, key, None, Reject("", url, "missing_key", f"row {i}: {cols.key_col} is null or empty")
        elif values == (None, None):
            yield i, key, (math.nan, math.nan), None
        elif lon_i is None:
            given = why == "missing_coordinates"  # one null beside a given coordinate
            yield i, key, None, Reject(key, url, why, f"row {i}: {detail}" + (" but the other is given (an unlabelled row has neither)"
                                                                                 if given else ""))
        else:  # a number type the fast check does not cover (e.g. decimal): the exact rule accepted it
            yield i, key, (lat_i, lon_i), None


def _field_stats(batch, names: list[str], here: np.ndarray, before: int, first: dict, stringy: dict) -> None:
    """Per meta column over the kept rows ``here`` of ``batch`` (``before`` rows kept earlier):
    ``first[name]``, the position of the first kept row with a value; ``stringy[name]``, whether
    every value so far is a JSON string (the store then keeps the strings themselves)."""
    import pyarrow as pa
    import pyarrow.types as pt

    for name in names:
        column = batch.column(name).take(pa.array(here, type=pa.int64()))
        valid = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        if not valid.any():
            continue
        first.setdefault(name, before + int(np.argmax(valid)))
        if stringy[name] and not (pt.is_string(column.type) or pt.is_large_string(column.type)):
            stringy[name] = meta_encoding([t for t in _json_texts(column) if t is not None]) == "string"


def _degrees(table, name: str) -> np.ndarray:
    """(n,) float64 of a numeric (not bool) column, NaN for null and for any other type (those
    rows then go through the exact per-value rule)."""
    import pyarrow as pa
    import pyarrow.types as pt

    col = table.column(name)
    if not (pt.is_integer(col.type) or pt.is_floating(col.type)):
        return np.full(table.num_rows, np.nan)
    return col.cast(pa.float64()).to_numpy(zero_copy_only=False)


def _json_texts(column) -> list:
    """The JSON text of each value of a metadata column (None for null); plain strings without
    quotes, backslashes or control characters are quoted directly (what json.dumps would write)."""
    import pyarrow.types as pt

    values = column.to_pylist()
    if pt.is_string(column.type) or pt.is_large_string(column.type):
        return [None if v is None else ('"' + v + '"' if '"' not in v and "\\" not in v and v.isprintable()
                                        else json.dumps(v, ensure_ascii=False)) for v in values]
    return [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values]

"""Precomputed embeddings: pairs of an (N, D) ``.npy`` file and an N-row Parquet metadata file.

Two layouts are discovered by :func:`discover_pairs`:

* clip-retrieval output folders: ``DIR/img_emb/img_emb_<i>.npy`` with
  ``DIR/metadata/metadata_<i>.parquet``, paired by the integer ``<i>``;
* plain pairs: ``X.npy`` with ``X.parquet`` beside it, given as paths, globs or brace patterns
  of the ``.npy`` files.

Row r of the metadata describes row r of the embeddings: a key column, latitude and longitude
in degrees, and extra columns carried into the store's ``meta/`` (JSON-encoded; null = absent).
Each pair becomes one "shard" of a store (its url is the ``.npy`` url), so imports are
resumable and incremental exactly like extraction. Files may be local or fsspec urls.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.ingest.rows import ShardRows
from geopipe.pipeline.ingest.shards import file_sha256, resolve_shards, shard_stat
from geopipe.pipeline.sphere.geometry import LAT_LIMIT, LON_LIMIT, coordinate_problem
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import META_NAME
from geopipe.pipeline.store.rejects import Reject

__all__ = ["PairError", "EmbeddingPair", "ColumnSpec", "NpyRows", "precomputed_identity", "discover_pairs", "pair_stat",
           "pair_sha256", "npy_embed_dim", "read_pair"]

_EMB = re.compile(r"^img_emb_(\d+)\.npy$")
_META = re.compile(r"^metadata_(\d+)\.parquet$")


class PairError(GeopipeError):
    """A pair that cannot be imported at all (missing partner, misaligned rows, missing column)."""


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


class NpyRows:
    """The rows of an (N, D) ``.npy`` file (local or fsspec url), read from the file a slice at a
    time: ``x[a:b]`` reads rows [a, b) (of ``index`` when given: the kept rows) and returns them
    as numpy in the file's dtype; the array is never loaded whole. ``peak_rows``: the most rows
    one read returned (shared by :meth:`select` views), so a caller can check its reads stay
    bounded by a few store chunks."""

    def __init__(self, url: str, index: np.ndarray | None = None, _header: tuple | None = None, _stats: list | None = None):
        self.url = url
        if _header is None:
            try:
                with fsio.open_read(url) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
                    shape, fortran, dtype = read_header(fh)
                    _header = (tuple(shape), fortran, np.dtype(dtype), fh.tell())
            except (ValueError, OSError, EOFError) as exc:
                raise PairError(f"{url}: not a readable .npy array ({' '.join(str(exc).split())[:200]})") from None
        self._header, self._stats, self.index = _header, _stats if _stats is not None else [0], index
        shape, fortran, self.dtype, _ = _header
        if len(shape) == 2 and (fortran or self.dtype.hasobject):
            raise PairError(f"{url}: a Fortran-ordered or object .npy cannot be imported; save it with np.save(path, np.ascontiguousarray(x))")
        self.shape = shape if index is None else (len(index), *shape[1:])
        self.ndim = len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def peak_rows(self) -> int:
        return self._stats[0]

    def select(self, index) -> NpyRows:
        """A view of the rows ``index`` (ascending row numbers of this view)."""
        index = np.asarray(index, dtype=np.int64)
        return NpyRows(self.url, index if self.index is None else self.index[index], self._header, self._stats)

    def _file_rows(self, start: int, stop: int) -> np.ndarray:
        _, _, dtype, offset = self._header
        per = int(np.prod(self._header[0][1:], dtype=np.int64))
        with fsio.open_read(self.url) as fh:
            fh.seek(offset + start * per * dtype.itemsize)
            data = fh.read((stop - start) * per * dtype.itemsize)
        if len(data) != (stop - start) * per * dtype.itemsize:
            raise PairError(f"{self.url}: the file is shorter than its .npy header says ({self.shape}); re-create it")
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, *self._header[0][1:])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("NpyRows reads contiguous slices only")
        a, b, _ = item.indices(len(self))
        b = max(a, b)
        if self.index is None:
            out = self._file_rows(a, b)
        else:
            rows = self.index[a:b]
            out = self._file_rows(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]] if len(rows) else self._file_rows(0, 0)
        self._stats[0] = max(self._stats[0], len(out))
        return out


def npy_embed_dim(url: str) -> int:
    """Width D of an (N, D) ``.npy`` (reads the header only)."""
    arr = NpyRows(url)
    if arr.ndim != 2 or arr.dtype.kind not in "fiu":
        raise PairError(f"{url}: expected an (N, D) numeric array of embeddings, got {arr.shape} {arr.dtype}")
    return int(arr.shape[1])


def _read_table(url: str):
    import pyarrow.parquet as pq

    try:
        source = url if fsio.is_local(url) else io.BytesIO(fsio.read_bytes(url))
        return pq.read_table(source)
    except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise PairError(f"{url}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None


def _meta_columns(table, cols: ColumnSpec, url: str) -> list[str]:
    import pyarrow.types as pt

    skip = {cols.key_col, cols.lat_col, cols.lon_col}
    if cols.meta_fields is not None:
        absent = [m for m in cols.meta_fields if m not in table.column_names]
        if absent:
            raise PairError(f"{url}: columns {absent} not found; it has {table.column_names}")
        return [m for m in cols.meta_fields if m not in skip]
    scalar = (pt.is_string, pt.is_large_string, pt.is_integer, pt.is_floating, pt.is_boolean, pt.is_temporal,
              pt.is_decimal, pt.is_dictionary)
    return [f.name for f in table.schema if f.name not in skip and META_NAME.match(f.name)
            and any(check(f.type) for check in scalar)]


def _coordinate(value, name: str, limit: float) -> tuple[float | None, str, str]:
    """→ (value or None, reject reason, detail)."""
    problem = coordinate_problem(value, name, limit)
    return (None, *problem) if problem is not None else (float(value), "", "")


def read_pair(pair: EmbeddingPair, cols: ColumnSpec, embed_dim: int | None = None) -> ShardRows:
    """Load a pair into :class:`~geopipe.pipeline.ingest.rows.ShardRows` (rows with a usable key and
    coordinates; rejects for the others). Raises PairError — before anything is written — for
    misaligned row counts, a missing column, or embeddings that are not (N, ``embed_dim``)."""
    emb, table = NpyRows(pair.embeddings), _read_table(pair.metadata)
    if emb.ndim != 2 or emb.dtype.kind not in "fiu" or (embed_dim is not None and emb.shape[1] != embed_dim):
        want = f"(N, {embed_dim})" if embed_dim is not None else "(N, D)"
        raise PairError(f"{pair.embeddings}: expected {want} numeric embeddings, got {emb.shape} {emb.dtype}")
    if emb.shape[0] != table.num_rows:
        raise PairError(f"pair misaligned: {pair.embeddings} has {emb.shape[0]} embeddings but {pair.metadata} has "
                        f"{table.num_rows} rows; row r of both files must describe the same image")
    absent = [c for c in (cols.key_col, cols.lat_col, cols.lon_col) if c not in table.column_names]
    if absent:
        raise PairError(f"{pair.metadata}: columns {absent} not found; it has {table.column_names} "
                        f"(choose the key/latitude/longitude columns)")
    names = _meta_columns(table, cols, pair.metadata)
    keys = ["" if k is None else str(k) for k in table.column(cols.key_col).to_pylist()]
    lat, lon = _degrees(table, cols.lat_col), _degrees(table, cols.lon_col)
    with np.errstate(invalid="ignore"):
        fine = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= LAT_LIMIT) & (np.abs(lon) <= LON_LIMIT)
    extra = {n: _json_texts(table.column(n)) for n in names}
    rows = ShardRows([], [], [], [], np.zeros((0, emb.shape[1]), np.float32), [])
    for i, key in enumerate(keys):
        if key and fine[i]:
            rows.idx.append(i)
            rows.keys.append(key)
            rows.latlon.append((float(lat[i]), float(lon[i])))
            rows.meta.append({n: v[i] for n, v in extra.items() if v[i] is not None})
            continue
        # a rejected row (rare): the exact rule and message of every ingest
        lon_i, (lat_i, why, detail) = None, _coordinate(table.column(cols.lat_col)[i].as_py(), cols.lat_col, LAT_LIMIT)
        if lat_i is not None:
            lon_i, why, detail = _coordinate(table.column(cols.lon_col)[i].as_py(), cols.lon_col, LON_LIMIT)
        if not key:
            rows.rejects.append((i, Reject("", pair.url, "missing_key", f"row {i}: {cols.key_col} is null or empty")))
        elif lon_i is None:
            rows.rejects.append((i, Reject(key, pair.url, why, f"row {i}: {detail}")))
        else:  # a number type the fast check does not cover (e.g. decimal): the exact rule accepted it
            rows.idx.append(i)
            rows.keys.append(key)
            rows.latlon.append((lat_i, lon_i))
            rows.meta.append({n: v[i] for n, v in extra.items() if v[i] is not None})
    idx = np.asarray(rows.idx, dtype=np.int64)
    rows.embeddings = emb if len(idx) == emb.shape[0] else emb.select(idx)  # read a few chunks at a time by the writer
    return rows


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

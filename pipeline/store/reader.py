"""Reading the Zarr v3 embedding store (layout and attributes: :mod:`geopipe.schemas.store`).

Only rows ``[0, attrs["rows"])`` are part of a store: arrays may be longer after an
interrupted extract, so every accessor here is clipped to the committed rows. Writing lives in
:mod:`geopipe.pipeline.store.writer`. ``path`` may be a local path or an fsspec url
(:mod:`geopipe.pipeline.core.fsio`); ``file://`` urls are read as local paths.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.chunks import CHUNK_DIGESTS_ATTR, check_chunks, chunk_refs
from geopipe.pipeline.store.format import count_labelled, meta_as_json
from geopipe.pipeline.store.rejects import read_rejects
from geopipe.schemas.rejects import REJECTS_SCHEMA
from geopipe.schemas.store import (
    ARRAY_EMBEDDINGS,
    ARRAY_KEYS,
    ARRAY_LATLON,
    ARRAY_SHARD,
    LABELLED_ATTR,
    META_ENCODING_ATTR,
    META_GROUP,
    META_TEXT_ATTR,
    META_TEXT_SUFFIX,
    STORE_SCHEMA,
    validate_store_attrs,
)

__all__ = ["META_NAME", "REJECTS_PARTS_DIR", "StoreError", "StoreData", "EmbeddingStore", "open_store", "read_store", "rejects_part_path"]

#: Valid names of ``meta/<name>`` arrays (at most 200 characters; "keys" is the meta group's
#: coordinate); json fields with other names are not carried by default.
META_NAME = re.compile(r"^(?!__)(?!keys$)[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
#: Per-shard rejects parts (``part-<shard index>.parquet``), the source of ``rejects.parquet``.
REJECTS_PARTS_DIR = "rejects"


class StoreError(GeopipeError):
    """A path that is not a (valid, compatible) geopipe embedding store."""


def rejects_part_path(store: str, index: int) -> str:
    """Path of the rejects part of the shard with completion-record index ``index``."""
    return fsio.join(store, REJECTS_PARTS_DIR, f"part-{index:06d}.parquet")


class _Rows:
    """Read-only view of a Zarr array clipped to the first ``rows`` rows; strings come back as ``object``."""

    def __init__(self, array, rows: int, guard=None):
        self._array, self._rows, self._guard = array, rows, guard
        self.shape = (rows, *array.shape[1:])
        self.dtype = np.dtype(object) if array.dtype.kind in "TUO" else np.dtype(array.dtype)

    def __len__(self) -> int:
        return self._rows

    def _read(self, start: int, stop: int, read):
        """``read()`` after the chunks of rows [start, stop) passed their digests; decoder errors
        become a one-line StoreError naming the array and rows."""
        if self._guard is not None:
            return self._guard(self._array, start, stop, read)
        return read()

    def __getitem__(self, item) -> np.ndarray:
        if isinstance(item, slice):
            sl = slice(*item.indices(self._rows))
            lo, hi = (sl.start, sl.stop) if sl.step > 0 else (sl.stop + 1, sl.start + 1)
            out = self._read(lo, hi, lambda: self._array[sl])
        elif isinstance(item, (int, np.integer)):
            i = int(item) + (self._rows if item < 0 else 0)
            if not 0 <= i < self._rows:
                raise IndexError(f"row {item} out of range for {self._rows} rows")
            out = self._read(i, i + 1, lambda: self._array[i])
        else:
            idx = np.asarray(item)
            idx = np.flatnonzero(idx) if idx.dtype == bool else np.where(idx < 0, idx + self._rows, idx)
            if idx.size and (idx.min() < 0 or idx.max() >= self._rows):
                raise IndexError(f"row index out of range for {self._rows} rows")
            out = self._read(int(idx.min()), int(idx.max()) + 1, lambda: self._array.get_orthogonal_selection((idx,))) if idx.size else self[0:0]
        return np.asarray(out, dtype=object) if self.dtype == object else np.asarray(out)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


class _JsonRows(_Rows):
    """A "string", "number" or "integer" meta array read back as JSON texts ("" = absent); a numeric
    field's ``~json`` array (``texts``, a view of the same rows) supplies the values that are not numbers."""

    def __init__(self, view: _Rows, encoding: str, texts: _Rows | None = None):
        super().__init__(view._array, view._rows, view._guard)
        self.dtype, self._encoding, self._texts = np.dtype(object), encoding, texts

    def __getitem__(self, item) -> np.ndarray:
        out = super().__getitem__(item)
        texts = None if self._texts is None else self._texts[item]
        if out.ndim == 0:
            return meta_as_json(out.reshape(1), self._encoding, None if texts is None else texts.reshape(1)).reshape(())
        return meta_as_json(out, self._encoding, texts)


@dataclass(frozen=True)
class StoreData:
    """A whole store in memory.

    embeddings: (N, D) in the requested dtype (default: the store's float16/float32).
    latlon: (N, 2) float64 degrees (latitude, longitude; NaN, NaN for unlabelled records). keys: (N,) object array of str.
    shard: (N,) int32 completion-record index. meta: name → (N,) object array of JSON strings.
    """

    embeddings: np.ndarray
    latlon: np.ndarray
    keys: np.ndarray
    shard: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)


class EmbeddingStore:
    """A store opened read-only. Raises :class:`StoreError` when ``path`` is not a geopipe store."""

    def __init__(self, path: str):
        import zarr

        self.path = fsio.normalize(str(path))
        if not fsio.isfile(fsio.join(self.path, "zarr.json")):
            raise StoreError(f"not a geopipe embedding store: {self.path} (no zarr.json; run `geopipe extract` first)")
        try:
            self._group = zarr.open_group(self.path, mode="r", use_consolidated=False)  # the arrays as they are
        except Exception as exc:
            raise StoreError(f"cannot open embedding store {self.path}: {exc}") from None
        self.attrs: dict = dict(self._group.attrs)
        if self.attrs.get("schema") != STORE_SCHEMA:
            raise StoreError(f"not a geopipe embedding store: {self.path} (attribute schema={self.attrs.get('schema')!r}, expected {STORE_SCHEMA!r})")
        problems = validate_store_attrs(self.attrs)
        if problems:
            raise StoreError(f"invalid embedding store {self.path}: {'; '.join(problems)}")
        self.rows: int = self.attrs["rows"]
        self._verified: dict[str, set] = {}  # array → chunk keys whose bytes matched their digest
        #: Compare chunk bytes with their commit-time digests before decoding (verification, which
        #: has already compared every chunk and decoded the suspects in a child, turns it off).
        self.check_digests = True
        self._labelled: int | None = None

    def _array(self, name: str) -> _Rows:
        try:
            return _Rows(self._group[name], self.rows, functools.partial(self._checked_read, name))
        except KeyError:
            raise StoreError(f"invalid embedding store {self.path}: array {name!r} is missing") from None

    def _checked_read(self, name: str, array, start: int, stop: int, read):
        """Run ``read`` (a decode of rows [start, stop) of array ``name``) once every chunk it
        touches matched its commit-time digest (each chunk hashed once per open store), so a
        damaged chunk is named instead of handed to a decoder that may crash on it."""
        known = (self.attrs.get(CHUNK_DIGESTS_ATTR) or {}).get(name)
        if known is not None and self.check_digests and stop > start:
            damaged, _ = check_chunks(self.path, self._group, self.attrs, only=[r for r in chunk_refs(array, name, self.rows, start, stop)
                                                                               if r.key not in self._verified.setdefault(name, set())])
            if damaged:
                ref, why = damaged[0]
                raise StoreError(f"store {self.path}: array {ref.array}, chunk {ref.key} (rows [{ref.start}, {ref.stop})) is damaged: "
                                 f"{why}; run `geopipe store verify {self.path}` and `geopipe store repair`")
            self._verified[name].update(r.key for r in chunk_refs(array, name, self.rows, start, stop))
        try:
            return read()
        except Exception as exc:  # codecs raise RuntimeError, ValueError, ...: the bytes on disk are damaged
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StoreError(f"store {self.path}: array {name} rows [{start}, {stop}) cannot be decoded ({type(exc).__name__}: {text}); "
                             f"run `geopipe store verify {self.path}`") from None

    @property
    def embed_dim(self) -> int:
        return int(self.attrs["embed_dim"])

    @property
    def chunk_rows(self) -> int:
        """Rows per stored chunk of the embeddings (the unit of streaming reads and Dask partitions)."""
        return int(self._group[ARRAY_EMBEDDINGS].chunks[0])

    @property
    def embeddings(self) -> _Rows:
        """(N, D) float16|float32 view; slicing returns numpy."""
        return self._array(ARRAY_EMBEDDINGS)

    @property
    def latlon(self) -> _Rows:
        """(N, 2) float64 degrees view; (NaN, NaN) rows are unlabelled records."""
        return self._array(ARRAY_LATLON)

    @property
    def labelled(self) -> int:
        """Rows with a location: ``attrs["labelled"]``, or (a store written before it) the rows
        with finite ``latlon``, counted once per open store."""
        known = self.attrs.get(LABELLED_ATTR)
        if isinstance(known, int) and not isinstance(known, bool):
            return known
        if self._labelled is None:
            self._labelled = count_labelled(self.latlon, 0, self.rows)
        return self._labelled

    @property
    def keys(self) -> _Rows:
        """(N,) keys view (object arrays of str)."""
        return self._array(ARRAY_KEYS)

    @property
    def shard(self) -> _Rows:
        """(N,) int32 shard-record index view."""
        return self._array(ARRAY_SHARD)

    @property
    def meta(self) -> dict[str, _Rows]:
        """Extra json fields: name → (N,) view of JSON-encoded strings ("" when absent), whatever
        the array's stored encoding (schemas/store.py: "string", "number" and "integer" arrays are
        encoded on read; a number reads as its shortest float text, ``44.45``, an integer field's
        whole numbers as integers)."""
        out = {}
        text_fields = set(self.attrs.get(META_TEXT_ATTR, []))
        for name in self.attrs["meta_fields"]:
            view = self._array(f"{META_GROUP}/{name}")
            encoding = view._array.attrs.get(META_ENCODING_ATTR, "json")
            texts = self._array(f"{META_GROUP}/{name}{META_TEXT_SUFFIX}") if name in text_fields else None
            out[name] = view if encoding == "json" else _JsonRows(view, encoding, texts)
        return out

    def __len__(self) -> int:
        return self.rows

    def rejects(self) -> pa.Table:
        """Rejects of every committed shard, in shard order (from the per-shard parts)."""
        tables = [read_rejects(rejects_part_path(self.path, i)) for i in range(len(self.attrs["shards"]))]
        return pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()

    def validate(self) -> list[str]:
        """Problems with attributes, array shapes and completion records (empty list = valid)."""
        problems = validate_store_attrs(self.attrs)
        d, rows = self.attrs.get("embed_dim"), self.rows
        names = [ARRAY_EMBEDDINGS, ARRAY_LATLON, ARRAY_KEYS, ARRAY_SHARD]
        names += [f"{META_GROUP}/{m}" for m in self.attrs.get("meta_fields", [])]
        names += [f"{META_GROUP}/{m}{META_TEXT_SUFFIX}" for m in self.attrs.get(META_TEXT_ATTR, [])]
        for name in names:
            try:
                arr = self._group[name]
            except KeyError:
                problems.append(f"array {name!r} is missing")
                continue
            if arr.shape[0] < rows:
                problems.append(f"array {name!r} has {arr.shape[0]} rows < attrs rows {rows}")
        emb = self._group.get(ARRAY_EMBEDDINGS)
        if emb is not None and (emb.shape[1:] != (d,) or str(emb.dtype) != self.attrs.get("dtype")):
            problems.append(f"embeddings are {emb.shape[1:]} {emb.dtype}, attrs say ({d},) {self.attrs.get('dtype')}")
        recs = sorted(self.attrs.get("shards", {}).values(), key=lambda r: r.get("index", -1))
        stop = 0
        for i, rec in enumerate(recs):
            if rec.get("index") != i or rec.get("start") != stop or rec.get("stop", -1) < stop:
                problems.append(f"shard records are not contiguous at index {i}")
                break
            stop = rec["stop"]
        else:
            if stop != rows:
                problems.append(f"shard records cover rows [0, {stop}) but attrs rows is {rows}")
        return problems


def open_store(path: str) -> EmbeddingStore:
    """Open an embedding store read-only (see :class:`EmbeddingStore`)."""
    return EmbeddingStore(path)


def read_store(path: str, dtype: str | None = None) -> StoreData:
    """Load every committed row of a store into memory.

    dtype: embeddings dtype ("float32", "float16") or None for the store's own (float16
    halves memory; call ``.astype(np.float32)`` where precision matters).
    """
    store = EmbeddingStore(path)
    emb = store.embeddings[:]
    return StoreData(
        embeddings=emb if dtype is None else emb.astype(dtype),
        latlon=store.latlon[:].astype(np.float64),
        keys=store.keys[:],
        shard=store.shard[:],
        meta={name: view[:] for name, view in store.meta.items()},
        attrs=store.attrs,
    )

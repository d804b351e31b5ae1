"""A store's layout on disk: creating a new store (arrays first, the root group last), its
meta arrays and how a shard's rows are written to them (:class:`MetaBlocks`: fields in their
encodings, the ``~json`` arrays beside numeric fields, the ``keys`` coordinate), rejects parts, the
single-writer lock, and the checks before appending to one.

Used by :class:`geopipe.pipeline.store.writer.StoreWriter`; the layout itself is described in
:mod:`geopipe.schemas.store`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from zarr.codecs import ZstdCodec

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.lockfile import DirLock, NullLock
from geopipe.pipeline.store.format import encode_meta_block, labelled_rows, meta_encoding, usable_embeddings
from geopipe.pipeline.store.hierarchy import check_attrs_size, checked, ensure_rejects_node, is_temporary, write_root
from geopipe.pipeline.store.reader import META_NAME, REJECTS_PARTS_DIR, StoreError, rejects_part_path
from geopipe.pipeline.store.rejects import read_rejects, write_rejects
from geopipe.schemas.rejects import REJECTS_SCHEMA
from geopipe.schemas.store import (
    ARRAY_ATTRS,
    ARRAY_COORD,
    ARRAY_EMBEDDINGS,
    ARRAY_KEYS,
    ARRAY_LATLON,
    ARRAY_SHARD,
    COORD_LABELS,
    DIMENSIONS,
    MAX_ATTR_BYTES,
    META_DIMENSIONS,
    META_ENCODING_ATTR,
    META_GROUP,
    META_KEYS,
    META_TEXT_ATTR,
    META_TEXT_SUFFIX,
    REJECTS_FILE,
    REJECTS_GROUP,
    STORE_SCHEMA,
)

__all__ = ["StoreMismatchError", "is_fresh_dir", "lock_store", "check_compatible", "check_shard", "create_array", "create_meta_array",
           "create_meta_text_array", "create_store", "drop_rejects_parts", "consolidate_rejects", "has_keys_coordinate",
           "meta_array_paths", "MetaBlocks"]


class StoreMismatchError(StoreError):
    """Appending with a different backbone, preprocessing, dtype or normalisation."""


_CREATION_LEFTOVERS = {".lock", ARRAY_EMBEDDINGS, ARRAY_LATLON, ARRAY_KEYS, ARRAY_SHARD, META_GROUP, ARRAY_COORD, REJECTS_GROUP}
_META_ATTRS = {  # per meta encoding (schemas/store.py)
    "json": {"long_name": "json field carried from the shards, as JSON text: its values are not all strings or all "
                          "numbers (\"\" when absent)", "coordinates": "keys"},
    "string": {"long_name": "string field carried from the shards (\"\" when absent)", "coordinates": "keys"},
    "number": {"long_name": "number field carried from the shards (NaN when absent)", "coordinates": "keys"},
    "integer": {"long_name": "integer field carried from the shards, as float64 (NaN when absent)", "coordinates": "keys"},
}
_META_KEYS_ATTRS = {"long_name": "record key, as in the root's keys array (the coordinate of the meta fields)"}


def is_fresh_dir(path: str) -> bool:
    """Empty, or holding only what an interrupted store creation leaves (no root zarr.json; temporary
    files of its killed writes)."""
    return {name for name in fsio.listdir(path) if not is_temporary(name)} <= _CREATION_LEFTOVERS


def lock_store(path: str) -> DirLock | NullLock:
    """Create ``path`` if needed and take ``path/.lock`` at once, before any slow work
    (loading a backbone); raises :class:`geopipe.pipeline.core.lockfile.LockedError` if it is held.

    Stores behind fsspec urls get a :class:`~geopipe.pipeline.core.lockfile.NullLock` and a warning:
    the lock is local-only, so concurrent writers of a remote store are not detected.
    """
    path = fsio.normalize(path)
    if not fsio.is_local(path):
        warnings.warn(f"store {path} is not on a local filesystem: the single-writer lock is local-only and "
                      f"is skipped; make sure no other process writes this store", stacklevel=2)
        return NullLock(path).acquire()
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreError(f"{path} exists and is not a directory; choose another store path")
    fsio.makedirs(path, "store")  # a location that cannot take it: one line
    return DirLock(path).acquire()


def check_compatible(path: str, attrs: dict, backbone: dict, dtype: str, normalize: bool) -> None:
    """Raise :class:`StoreMismatchError` when appending with another backbone identity, dtype or normalisation."""
    old = attrs["backbone"]
    if old != backbone:
        diff = sorted(k for k in set(old) | set(backbone) if old.get(k) != backbone.get(k))
        raise StoreMismatchError(
            f"store {path} holds embeddings of backbone {old.get('name')!r} (pretrained={old.get('pretrained')!r}); "
            f"refusing to append from {backbone.get('name')!r} (pretrained={backbone.get('pretrained')!r}), which differs in "
            f"{diff}; extract into a new store"
        )
    if attrs["dtype"] != dtype or attrs["normalized"] != normalize:
        raise StoreMismatchError(
            f"store {path} holds {attrs['dtype']} embeddings with normalized={attrs['normalized']}; refusing to append "
            f"{dtype} with normalized={normalize}; use the same options or a new store"
        )


def check_shard(path: str, url: str, raw, ll: np.ndarray, keys: list[str], meta, attrs: dict, keys_seen: set[str],
                blocks: list[tuple[int, int]]) -> None:
    """Validate one shard's rows for store ``path`` before anything is written (ValueError naming the shard): (n, D)
    embeddings ``raw`` usable (checked a block [a, b) of ``blocks`` at a time), (n, 2) degrees
    ``ll`` with both coordinates or neither, keys new (not in ``keys_seen``) and unique, meta
    values per field and field names valid (:data:`~geopipe.pipeline.store.reader.META_NAME`)."""
    n, d = len(keys), attrs["embed_dim"]
    if url in attrs["shards"]:
        raise ValueError(f"shard {url} is already in store {path}")
    if raw.shape != (n, d) or ll.shape != (n, 2) or any(len(v) != n for v in meta.values()):
        raise ValueError(f"shard {url}: expected ({n}, {d}) embeddings, ({n}, 2) latlon and {n} meta values per field, "
                         f"got {raw.shape}, {ll.shape}")
    bad = sum(int((~usable_embeddings(np.asarray(raw[a:b]), attrs["dtype"], attrs["normalized"])).sum()) for a, b in blocks)
    if bad:
        raise ValueError(f"shard {url}: {bad} embeddings are non-finite, zero or overflow {attrs['dtype']}")
    mixed = ~(labelled_rows(ll) | np.isnan(ll).all(axis=1))
    if mixed.any():
        raise ValueError(f"shard {url}: {int(mixed.sum())} rows with non-finite coordinates (first: {keys[int(np.flatnonzero(mixed)[0])]!r}); "
                         f"a row has both coordinates or, unlabelled, neither (NaN, NaN)")
    dup = keys_seen.intersection(keys)
    if dup or len(set(keys)) != n:
        raise ValueError(f"shard {url}: keys must be new and unique; repeated: {sorted(dup)[:5] or 'within the shard'}")
    bad = [m for m in meta if not META_NAME.match(m)]
    if bad:
        raise ValueError(f"shard {url}: invalid meta field names {[m[:40] for m in bad[:5]]} (letters, digits, '_', '-', '.'; "
                         f"at most 200 characters; not 'keys')")


def create_array(url: str, **spec):
    """Create an array rooted at its own url, touching nothing outside it (``Group.create_array``
    also writes every parent's zarr.json "if not exists": an extra exists+PUT on object stores)."""
    import zarr

    return zarr.create_array(store=url, overwrite=True, **spec)


def create_meta_array(path: str, name: str, rows: int, chunk_rows: int, encoding: str):
    """A new ``meta/<name>`` array of store ``path`` with ``rows`` rows of "absent" ("" or NaN), stored
    in ``encoding`` (schemas.store.META_ENCODINGS)."""
    numeric = encoding in ("number", "integer")
    attrs = {**_META_ATTRS[encoding], META_ENCODING_ATTR: encoding}
    if numeric:
        attrs["long_name"] += f"; values that are not numbers: meta/{name}{META_TEXT_SUFFIX}, when it exists"
    return create_array(fsio.join(path, META_GROUP, name), shape=(rows,), chunks=(chunk_rows,), dimension_names=META_DIMENSIONS,
                        dtype="float64" if numeric else str, fill_value=float("nan") if numeric else "",
                        compressors=checked(ZstdCodec(level=3)), attributes=attrs)


def create_meta_text_array(path: str, name: str, rows: int, chunk_rows: int):
    """``meta/<name>~json``: the JSON text of the values of numeric field ``name`` that are not numbers
    ("" on the ``rows`` rows it starts with)."""
    attrs = {"long_name": f"JSON text of the values of meta/{name} that are not numbers (\"\" on every other row)",
             "coordinates": "keys", META_ENCODING_ATTR: "json"}
    return create_array(fsio.join(path, META_GROUP, name + META_TEXT_SUFFIX), shape=(rows,), chunks=(chunk_rows,), dtype=str,
                        fill_value="", compressors=checked(ZstdCodec(level=3)), dimension_names=META_DIMENSIONS, attributes=attrs)


def drop_rejects_parts(path: str, n: int) -> None:
    """Delete the rejects parts of record indices >= n (left by an interrupted or truncated run)."""
    parts = fsio.join(path, REJECTS_PARTS_DIR)
    for name in fsio.listdir(parts):
        if name.startswith("part-") and name.endswith(".parquet") and int(name[5:11]) >= n:
            fsio.remove(fsio.join(parts, name))


def consolidate_rejects(path: str, n_shards: int) -> bool:
    """Make ``rejects.parquet`` the parts of the first ``n_shards`` records, concatenated; True when
    it was missing, unreadable or different (then it is rewritten, atomically)."""
    import pyarrow as pa

    tables = [read_rejects(rejects_part_path(path, i)) for i in range(n_shards)]
    whole = pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table()
    url = fsio.join(path, REJECTS_FILE)
    try:
        if fsio.exists(url) and read_rejects(url).equals(whole):
            return False
    except GeopipeError:  # damaged: rebuilt below
        pass
    write_rejects(url, whole)
    return True


def create_store(path: str, backbone: dict, embed_dim: int, dtype: str, normalize: bool, created_by: dict, chunk_rows: int,
                 max_attr_bytes: int = MAX_ATTR_BYTES):
    """Arrays first, the group's zarr.json (with the schema attribute) last: an interrupted
    creation leaves no store, only leftovers that the next creation overwrites. Every array's
    chunks carry a crc32c checksum; ``meta/keys`` is the meta group's coordinate."""
    import zarr
    from zarr.codecs import BloscCodec

    attrs = {
        "schema": STORE_SCHEMA, "rows": 0, "embed_dim": int(embed_dim), "dtype": dtype, "normalized": bool(normalize),
        "backbone": backbone, "shards": {}, "rejects": {}, "meta_fields": [], "created_by": created_by, "fingerprint": "",
    }
    check_attrs_size(path, attrs, max_attr_bytes)
    floats = checked(BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"))
    strings = checked(ZstdCodec(level=3))
    arrays = {
        ARRAY_EMBEDDINGS: dict(shape=(0, embed_dim), chunks=(chunk_rows, embed_dim), dtype=dtype, compressors=floats, fill_value=0),
        ARRAY_LATLON: dict(shape=(0, 2), chunks=(chunk_rows, 2), dtype="float64", compressors=floats, fill_value=0),
        ARRAY_KEYS: dict(shape=(0,), chunks=(chunk_rows,), dtype=str, compressors=strings, fill_value=""),
        ARRAY_SHARD: dict(shape=(0,), chunks=(chunk_rows,), dtype="int32", compressors=floats, fill_value=-1),
    }
    arrays[ARRAY_COORD] = dict(shape=(len(COORD_LABELS),), chunks=(len(COORD_LABELS),), dtype=str, compressors=strings, fill_value="")
    for name, spec in arrays.items():
        arr = create_array(fsio.join(path, name), dimension_names=DIMENSIONS[name], attributes=ARRAY_ATTRS[name], **spec)
        if name == ARRAY_COORD:
            arr[:] = np.asarray(COORD_LABELS, dtype=object)
    zarr.create_group(store=fsio.join(path, META_GROUP), overwrite=True)
    create_array(fsio.join(path, META_GROUP, META_KEYS), dimension_names=META_DIMENSIONS, attributes=_META_KEYS_ATTRS,
                 **arrays[ARRAY_KEYS])
    ensure_rejects_node(path)
    group = zarr.create_group(store=path, attributes=attrs)
    write_root(path, group, attrs)  # with the consolidated metadata
    return group


def has_keys_coordinate(group, attrs: dict) -> bool:
    """Whether the store keeps ``meta/keys`` as the meta coordinate (stores written before it do
    not, nor do stores with a meta field named "keys")."""
    if META_KEYS in attrs["meta_fields"] or META_GROUP not in group:
        return False
    return META_KEYS in set(group[META_GROUP].array_keys())


def meta_array_paths(attrs: dict, keys_coordinate: bool) -> list[str]:
    """Paths of every committed array under ``meta/`` with a record axis: the fields, the ``~json``
    arrays of ``attrs["meta_text"]`` and the keys coordinate."""
    paths = [f"{META_GROUP}/{m}" for m in attrs["meta_fields"]]
    paths += [f"{META_GROUP}/{m}{META_TEXT_SUFFIX}" for m in attrs.get(META_TEXT_ATTR, [])]
    return paths + ([f"{META_GROUP}/{META_KEYS}"] if keys_coordinate else [])


class MetaBlocks:
    """One shard's meta writes, rows [``start``, ``start + n``) of the store: creates the shard's new
    fields (encoding from ``hints`` or their values), then :meth:`write` a block at a time. A
    numeric field's value that is not a number goes, as JSON text, to ``meta/<field>~json``
    (created on first need); :attr:`text_fields` lists the fields that have one, for the commit."""

    def __init__(self, path: str, group, attrs: dict, meta: Mapping[str, Sequence[str]], start: int, n: int,
                 chunk_rows: int, hints: Mapping[str, str] | None, keys_coordinate: bool):
        self.path, self._group, self.start, self.n, self._chunk_rows = path, group, start, n, chunk_rows
        self.fields = list(attrs["meta_fields"]) + [m for m in meta if m not in attrs["meta_fields"]]
        for name in self.fields:
            if name not in attrs["meta_fields"]:  # new field: absent for every earlier row
                create_meta_array(path, name, start, chunk_rows, (hints or {}).get(name) or meta_encoding(meta[name]))
        self.text_fields: list[str] = list(attrs.get(META_TEXT_ATTR, []))
        self._keys = keys_coordinate
        self.arrays = {f"{META_GROUP}/{name}": group[f"{META_GROUP}/{name}"] for name in self.fields}
        self.arrays.update({f"{META_GROUP}/{name}{META_TEXT_SUFFIX}": group[f"{META_GROUP}/{name}{META_TEXT_SUFFIX}"]
                            for name in self.text_fields})
        if keys_coordinate:
            self.arrays[f"{META_GROUP}/{META_KEYS}"] = group[f"{META_GROUP}/{META_KEYS}"]
        self._encodings = {name: self.arrays[f"{META_GROUP}/{name}"].attrs.get(META_ENCODING_ATTR, "json") for name in self.fields}

    def write(self, a: int, b: int, meta: Mapping[str, Sequence[str]], keys: np.ndarray) -> None:
        """Rows [a, b) of the shard: every field (absent ones as absent), their ``~json`` arrays, the keys."""
        lo, hi = self.start + a, self.start + b
        for name in self.fields:
            values = meta[name][a:b] if name in meta else [""] * (b - a)
            stored, texts = encode_meta_block(values, self._encodings[name])
            self.arrays[f"{META_GROUP}/{name}"][lo:hi] = stored
            if texts is not None or name in self.text_fields:
                self._text_array(name)[lo:hi] = texts if texts is not None else np.full(b - a, "", dtype=object)
        if self._keys:
            self.arrays[f"{META_GROUP}/{META_KEYS}"][lo:hi] = keys

    def _text_array(self, name: str):
        path = f"{META_GROUP}/{name}{META_TEXT_SUFFIX}"
        if name not in self.text_fields:
            self.arrays[path] = create_meta_text_array(self.path, name, self.start + self.n, self._chunk_rows)
            self.text_fields.append(name)
        return self.arrays[path]

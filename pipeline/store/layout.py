"""A store's layout on disk: creating a new store (arrays first, the root group last), its
meta arrays, rejects group and rejects parts, the single-writer lock, and the checks before appending to one.

Used by :class:`geopipe.pipeline.store.writer.StoreWriter`; the layout itself is described in
:mod:`geopipe.schemas.store`.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from zarr.codecs import ZstdCodec

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.lockfile import DirLock, NullLock
from geopipe.pipeline.store.reader import REJECTS_PARTS_DIR, StoreError, rejects_part_path
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
    META_DIMENSIONS,
    META_ENCODING_ATTR,
    META_GROUP,
    REJECTS_FILE,
    REJECTS_GROUP,
    STORE_SCHEMA,
)

__all__ = ["StoreMismatchError", "is_fresh_dir", "lock_store", "check_compatible", "create_array", "create_meta_array",
           "create_rejects_group", "create_store", "drop_rejects_parts", "consolidate_rejects"]


class StoreMismatchError(StoreError):
    """Appending with a different backbone, preprocessing, dtype or normalisation."""


_CREATION_LEFTOVERS = {".lock", ARRAY_EMBEDDINGS, ARRAY_LATLON, ARRAY_KEYS, ARRAY_SHARD, META_GROUP, ARRAY_COORD, REJECTS_GROUP}
_META_ATTRS = {  # per meta encoding (schemas/store.py)
    "json": {"long_name": "json field carried from the shards (JSON-encoded; \"\" when absent)", "coordinates": "keys"},
    "string": {"long_name": "string field carried from the shards (\"\" when absent)", "coordinates": "keys"},
}


def is_fresh_dir(path: str) -> bool:
    """Empty, or holding only what an interrupted store creation leaves (no root zarr.json)."""
    return set(fsio.listdir(path)) <= _CREATION_LEFTOVERS


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
    os.makedirs(path, exist_ok=True)
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


def create_array(url: str, **spec):
    """Create an array rooted at its own url, touching nothing outside it (``Group.create_array``
    also writes every parent's zarr.json "if not exists": an extra exists+PUT on object stores)."""
    import zarr

    return zarr.create_array(store=url, overwrite=True, **spec)


def create_meta_array(path: str, name: str, rows: int, chunk_rows: int, encoding: str):
    """A new ``meta/<name>`` array of store ``path`` with ``rows`` rows of "" (absent), stored in
    ``encoding`` ("json" or "string")."""
    return create_array(fsio.join(path, META_GROUP, name), shape=(rows,), chunks=(chunk_rows,), dtype=str, fill_value="",
                        compressors=ZstdCodec(level=3), dimension_names=META_DIMENSIONS,
                        attributes={**_META_ATTRS[encoding], META_ENCODING_ATTR: encoding})


def create_rejects_group(path: str) -> None:
    """The ``rejects/`` group: a zarr.json that makes the folder of Parquet files a known member."""
    import zarr

    if fsio.isfile(fsio.join(path, REJECTS_GROUP, "zarr.json")):
        return
    zarr.create_group(store=fsio.join(path, REJECTS_GROUP), overwrite=False,  # never delete parts already there
                      attributes={"content": "Parquet tables, not Zarr arrays: rejects.parquet and part-<shard index>.parquet"})


def drop_rejects_parts(path: str, n: int) -> None:
    """Delete the rejects parts of record indices >= n (left by an interrupted or truncated run)."""
    parts = fsio.join(path, REJECTS_PARTS_DIR)
    for name in fsio.listdir(parts):
        if name.startswith("part-") and name.endswith(".parquet") and int(name[5:11]) >= n:
            fsio.remove(fsio.join(parts, name))


def consolidate_rejects(path: str, n_shards: int) -> None:
    """Rewrite ``rejects.parquet`` from the parts of the first ``n_shards`` records."""
    import pyarrow as pa

    tables = [read_rejects(rejects_part_path(path, i)) for i in range(n_shards)]
    write_rejects(fsio.join(path, REJECTS_FILE), pa.concat_tables(tables) if tables else REJECTS_SCHEMA.empty_table())


def create_store(path: str, backbone: dict, embed_dim: int, dtype: str, normalize: bool, created_by: dict, chunk_rows: int):
    """Arrays first, the group's zarr.json (with the schema attribute) last: an interrupted
    creation leaves no store, only leftovers that the next creation overwrites."""
    import zarr
    from zarr.codecs import BloscCodec

    floats = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")
    strings = ZstdCodec(level=3)
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
    create_rejects_group(path)
    attrs = {
        "schema": STORE_SCHEMA, "rows": 0, "embed_dim": int(embed_dim), "dtype": dtype, "normalized": bool(normalize),
        "backbone": backbone, "shards": {}, "rejects": {}, "meta_fields": [], "created_by": created_by, "fingerprint": "",
    }
    return zarr.create_group(store=path, attributes=attrs)

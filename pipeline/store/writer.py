"""Appending shards to a Zarr v3 embedding store, crash-safely (layout: :mod:`geopipe.schemas.store`).

Commit protocol of :meth:`StoreWriter.append_shard` (one shard's rows ``[start, stop)``):

1. resize every array to ``stop`` rows (dropping rows an interrupted run left past
   ``attrs["rows"]``) and write rows ``[start, stop)`` of every array, meta included;
2. write the shard's rejects part ``rejects/part-<index>.parquet`` (atomic rename);
3. update the group attributes — ``rows``, the shard's completion record, reject counts,
   ``labelled``, ``meta_fields``, ``fingerprint``, chunk digests — and the consolidated metadata of
   every node in one atomic write of ``zarr.json``. This is the commit.

A crash before 3 leaves only data past ``attrs["rows"]`` and parts past the last record, which
the next writer overwrites or deletes, so a resumed extract ends with the same store as an
uninterrupted one. ``rejects.parquet`` is consolidated from the parts when a writer opens and
closes; :meth:`geopipe.pipeline.store.reader.EmbeddingStore.rejects` reads the parts directly.
Opening a writer also removes the temporary files killed writes left (older than its lock) and
brings an older store's ``rejects`` node and consolidated metadata up to date.

:meth:`StoreWriter.truncate` drops the last shards (re-extraction of changed shards) with the
same single atomic commit. Stores may live behind fsspec urls (:mod:`geopipe.pipeline.core.fsio`); the
single-writer lock is then skipped with a warning (object stores have no exclusive create).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.core.lockfile import DirLock, NullLock
from geopipe.pipeline.sphere.geometry import wrap_latlon
from geopipe.pipeline.store.chunks import CHUNK_DIGESTS_ATTR, bytes_digest, record_digests, restore_last_chunks
from geopipe.pipeline.store.format import (
    DTYPES,
    ShardStat,
    chain_fingerprint,
    count_labelled,
    labelled_rows,
    prepare_embeddings,
    shard_digest,
)
from geopipe.pipeline.store.hierarchy import (
    check_attrs_size,
    consolidated_status,
    ensure_rejects_node,
    open_group,
    remove_stale_temporaries,
    write_root,
)
from geopipe.pipeline.store.layout import (
    MetaBlocks,
    StoreMismatchError,
    check_compatible,
    check_shard,
    consolidate_rejects,
    create_store,
    drop_rejects_parts,
    has_keys_coordinate,
    is_fresh_dir,
    lock_store,
    meta_array_paths,
)
from geopipe.pipeline.store.reader import EmbeddingStore, StoreError, rejects_part_path
from geopipe.pipeline.store.rejects import Reject, count_reasons, read_rejects, write_rejects
from geopipe.schemas.store import (
    ARRAY_EMBEDDINGS,
    ARRAY_KEYS,
    ARRAY_LATLON,
    ARRAY_SHARD,
    LABELLED_ATTR,
    LEGACY_REJECTS_FILE,
    MAX_ATTR_BYTES,
    META_GROUP,
    META_TEXT_ATTR,
)

__all__ = ["StoreMismatchError", "StoreWriter", "prepare_embeddings", "shard_digest", "chain_fingerprint", "DTYPES"]

#: Store chunks of embeddings per block of :meth:`StoreWriter.append_shard` (memory: this many chunks).
_BLOCK_CHUNKS = 2


class StoreWriter:
    """Single writer of one store (holds ``STORE/.lock``); create with :meth:`open`, then ``append_shard``, ``close``."""

    def __init__(self, path: str, group, lock: DirLock | NullLock, max_attr_bytes: int = MAX_ATTR_BYTES):
        self.path, self._group, self._lock, self.max_attr_bytes = path, group, lock, max_attr_bytes
        self.attrs: dict = dict(group.attrs)
        self._keys_seen: set[str] | None = None  # read on first use (a repair truncates before reading keys)
        self._meta_keys = has_keys_coordinate(group, self.attrs)
        #: What opening found and fixed: temporary files removed, rejects.parquet rebuilt, rejects node and
        #: consolidated metadata written (names of the repairs; see :meth:`_repair`).
        self.housekeeping: dict[str, int] = {}

    lock = staticmethod(lock_store)

    @classmethod
    def open(cls, path: str, *, backbone: dict, embed_dim: int, dtype: str = "float16", normalize: bool = True,
             created_by: dict | None = None, chunk_rows: int = 4096,
             lock: DirLock | NullLock | None = None, max_attr_bytes: int = MAX_ATTR_BYTES) -> StoreWriter:
        """Create ``path`` or open it for appending.

        backbone: the backbone identity dict (``Backbone.identity``); created_by: provenance
        and config recorded at creation; lock: a held :meth:`lock` of ``path`` to take over
        (taken here otherwise; released by :meth:`close`); max_attr_bytes: bound on the group
        attributes that do not grow with the store (:func:`~geopipe.pipeline.store.hierarchy.check_attrs_size`).
        Raises :class:`StoreMismatchError` when the existing store's backbone identity, dtype or
        normalisation differ.
        """
        if dtype not in DTYPES:
            raise ConfigError(f"unknown embedding dtype {dtype!r}; choose one of {list(DTYPES)}")
        path = fsio.normalize(path)
        lock = lock if lock is not None else cls.lock(path)
        try:
            if fsio.isfile(fsio.join(path, "zarr.json")):
                EmbeddingStore(path)  # raises StoreError if not a valid store
                group = open_group(path, mode="r+")
                check_compatible(path, dict(group.attrs), backbone, dtype, normalize)
            elif is_fresh_dir(path):
                group = create_store(path, backbone, embed_dim, dtype, normalize, created_by or {}, chunk_rows, max_attr_bytes)
            else:
                raise StoreError(f"{path} exists, is not empty and is not a geopipe store; choose a new store path")
            writer = cls(path, group, lock, max_attr_bytes)
            writer._repair()
        except BaseException:
            lock.release()
            raise
        return writer

    @property
    def keys_seen(self) -> set[str]:
        """Keys of every committed row (read from the store on first use)."""
        if self._keys_seen is None:
            self._keys_seen = set(EmbeddingStore(self.path).keys[:].tolist())
        return self._keys_seen

    @property
    def rows(self) -> int:
        return int(self.attrs["rows"])

    @property
    def block_rows(self) -> int:
        """Rows of embeddings validated, prepared and written at a time: a few store chunks (one
        Zarr write compresses its chunks in parallel)."""
        return _BLOCK_CHUNKS * self._chunk_rows()

    @property
    def shards(self) -> dict:
        """url → completion record of every committed shard."""
        return self.attrs["shards"]

    def _repair(self) -> None:
        """Drop what an interrupted run left uncommitted (arrays, rows, rejects parts, temporary files),
        rebuild rejects.parquet, and bring the rejects node and consolidated metadata up to date."""
        meta = self._group.require_group(META_GROUP)
        keep = set(meta_array_paths(self.attrs, self._meta_keys))
        for name in list(meta.array_keys()):
            if f"{META_GROUP}/{name}" not in keep:
                del meta[name]
        self._restore_last_chunks()
        self._trim()
        drop_rejects_parts(self.path, len(self.shards))
        lock = self._lock.path if isinstance(self._lock, DirLock) and self._lock.held else None
        self._note("temporary files removed", remove_stale_temporaries(self.path, lock))
        self._note("rejects node written", ensure_rejects_node(self.path))
        if fsio.exists(fsio.join(self.path, LEGACY_REJECTS_FILE)):  # a store from before the rejects folder
            fsio.remove(fsio.join(self.path, LEGACY_REJECTS_FILE))
        self._note("rejects.parquet rebuilt from its parts", consolidate_rejects(self.path, len(self.shards)))
        self._note("consolidated metadata written", self._consolidate())

    def _note(self, what: str, count: int | bool) -> None:
        if count:
            self.housekeeping[what] = int(count)

    def _consolidate(self) -> bool:
        """Rewrite the root zarr.json (same attributes) when its consolidated metadata is not current."""
        if consolidated_status(self.path, self._group, self.rows)[0] == "current":
            return False
        self._commit({})
        return True

    def _restore_last_chunks(self) -> None:
        """Rewrite the chunks an interrupted append left past the committed rows
        (:func:`~geopipe.pipeline.store.chunks.restore_last_chunks`) and commit their digests anew."""
        digests = restore_last_chunks(self.path, self._group, self.rows, self.attrs.get(CHUNK_DIGESTS_ATTR))
        if digests is not None:
            update = {CHUNK_DIGESTS_ATTR: digests}
            self._commit(update)
            self.attrs.update(update)

    def _trim(self) -> None:
        """Cut every array to the committed rows (the store's rows rule): rows an interrupted or
        truncating run left past ``attrs["rows"]`` go."""
        names = [ARRAY_EMBEDDINGS, ARRAY_LATLON, ARRAY_KEYS, ARRAY_SHARD] + meta_array_paths(self.attrs, self._meta_keys)
        for name in names:
            arr = self._group[name]
            if arr.shape[0] > self.rows:
                arr.resize((self.rows, *arr.shape[1:]))

    def append_shard(self, url: str, embeddings: np.ndarray, latlon: np.ndarray, keys: Sequence[str],
                     meta: Mapping[str, Sequence[str]], rejects: Sequence[Reject], stat: ShardStat,
                     meta_encodings: Mapping[str, str] | None = None) -> dict:
        """Append one shard's rows and commit its completion record (see the module docstring).

        embeddings: (n, D) raw float embeddings (normalised and cast here), an array or any row
        source whose ``[a:b]`` slices are arrays (e.g. ``ingest.rows.NpyRows``): they are read a
        few store chunks at a time (``block_rows``), so memory holds a block of them, not the shard; latlon: (n, 2)
        degrees (wrapped here, docs/methods.md#conventions); keys: (n,) new unique keys; meta: field → (n,) JSON
        strings (absent fields are ""), lists or sources whose ``[a:b]`` slices are lists (read a block
        at a time, like the embeddings); meta_encodings: the stored encoding of each new field when
        the caller knows it (else decided from its values, :func:`~geopipe.pipeline.store.format.meta_encoding`);
        rejects: this shard's rejects. Returns the record.
        """
        keys, n = [str(k) for k in keys], len(keys)
        raw = embeddings if hasattr(embeddings, "shape") else np.asarray(embeddings)
        ll = np.asarray(latlon, dtype=np.float64)
        if n == 0:  # a shard whose samples were all rejected
            raw, ll = np.asarray(raw[0:0]).reshape(0, self.attrs["embed_dim"]), ll.reshape(0, 2)
        check_attrs_size(self.path, {"shards": {url: None}}, self.max_attr_bytes)  # before anything is written
        check_shard(self.path, url, raw, ll, keys, meta, self.attrs, self.keys_seen, list(self._blocks(self.rows, len(keys))))
        lat, lon = wrap_latlon(ll[:, 0], ll[:, 1])
        coords = np.stack([lat, lon], axis=1)
        labelled = labelled_rows(coords)
        coords[~labelled] = np.nan  # unlabelled rows: (NaN, NaN) with one bit pattern, so digests are reproducible
        start, index = self.rows, len(self.shards)
        metas = MetaBlocks(self.path, self._group, self.attrs, meta, start, n, self._chunk_rows(), meta_encodings, self._meta_keys)
        arrs = {name: self._group[name] for name in (ARRAY_EMBEDDINGS, ARRAY_LATLON, ARRAY_KEYS, ARRAY_SHARD)}
        digest = hashlib.sha256("\n".join(keys).encode())
        for arr in [*arrs.values(), *metas.arrays.values()]:
            if arr.shape[0] != start + n:
                arr.resize((start + n, *arr.shape[1:]))
        for a, b in self._blocks(start, n):  # every array a block of rows at a time: memory holds a block, not the shard
            emb, _ = prepare_embeddings(np.asarray(raw[a:b]), self.attrs["dtype"], self.attrs["normalized"])
            arrs[ARRAY_EMBEDDINGS][start + a:start + b] = emb
            digest.update(np.ascontiguousarray(emb).tobytes())
            arrs[ARRAY_LATLON][start + a:start + b] = coords[a:b]
            block_keys = np.asarray(keys[a:b], dtype=object)
            arrs[ARRAY_KEYS][start + a:start + b] = block_keys
            arrs[ARRAY_SHARD][start + a:start + b] = np.full(b - a, index, dtype=np.int32)
            metas.write(a, b, meta, block_keys)
        part = rejects_part_path(self.path, index)
        if rejects:
            write_rejects(part, rejects)
        else:
            fsio.remove(part)
        digest.update(np.ascontiguousarray(coords, dtype=np.float64).tobytes())
        digest = digest.hexdigest()  # = shard_digest(keys, stored embeddings, coords), hashed a block at a time
        record = {"index": index, "start": start, "stop": start + n, "n_ok": n, "n_rejected": len(rejects),
                  "size": stat.size, "mtime": stat.mtime, "digest": digest, "sha256": stat.sha256, "labelled": int(labelled.sum())}
        counts = dict(self.attrs["rejects"])
        for reason, c in count_reasons(rejects).items():
            counts[reason] = counts.get(reason, 0) + c
        update = {"rows": start + n, "shards": {**self.shards, url: record}, "rejects": counts, "meta_fields": metas.fields,
                  "fingerprint": chain_fingerprint(self.attrs.get("fingerprint", ""), [digest]),
                  LABELLED_ATTR: self._labelled(start) + record["labelled"]}
        if metas.text_fields:
            update[META_TEXT_ATTR] = metas.text_fields
        if rejects:
            record["rejects_digest"] = bytes_digest(fsio.read_bytes(part))
        self._record_chunk_digests(update, start, start + n)
        self._commit(update)
        self.attrs.update(update)
        self.keys_seen.update(keys)
        return record

    def truncate(self, index: int) -> list[str]:
        """Drop the shards with record index >= ``index`` (and their rows and rejects) in one
        commit; returns their urls in record order. Used to re-extract changed shards: the
        rows of every later shard go too, since a store's shards are contiguous row ranges."""
        recs = sorted(self.shards.items(), key=lambda kv: kv[1]["index"])
        if not 0 <= index <= len(recs):
            raise ValueError(f"cannot truncate store {self.path} at shard index {index}: it has {len(recs)} shards")
        keep, drop = dict(recs[:index]), [url for url, _ in recs[index:]]
        rows = recs[index][1]["start"] if drop else self.rows
        counts: dict[str, int] = {}
        for i in range(index):
            for reason, c in count_reasons(read_rejects(rejects_part_path(self.path, i))).items():
                counts[reason] = counts.get(reason, 0) + c
        digests = [rec.get("digest", "") for _, rec in recs[:index]]
        update = {"rows": rows, "shards": keep, "rejects": counts, "fingerprint": chain_fingerprint("", digests)}
        if all("labelled" in rec for _, rec in recs[:index]):
            update[LABELLED_ATTR] = sum(int(rec["labelled"]) for _, rec in recs[:index])
        else:  # a store written before the counts: count what stays
            update[LABELLED_ATTR] = count_labelled(self._group[ARRAY_LATLON], 0, rows)
        self._record_chunk_digests(update, rows, rows)
        self._commit(update)
        self.attrs.update(update)
        self._trim()
        self._consolidate()
        self._keys_seen = None
        drop_rejects_parts(self.path, index)
        consolidate_rejects(self.path, len(self.shards))
        return drop

    def _labelled(self, rows: int) -> int:
        """Labelled rows among the committed [0, ``rows``): the ``labelled`` attribute, or counted
        for a store written before it (schemas/store.py)."""
        known = self.attrs.get(LABELLED_ATTR)
        if isinstance(known, int) and not isinstance(known, bool):
            return known
        return count_labelled(self._group[ARRAY_LATLON], 0, rows)

    def _blocks(self, start: int, n: int):
        """[a, b) ranges of a shard's n rows (written from store row ``start``) along store chunks,
        :attr:`block_rows` at most."""
        per, a = self.block_rows, 0
        while a < n:
            b = min(n, a + per - (start + a) % per)
            yield a, b
            a = b

    def _record_chunk_digests(self, update: dict, start: int, stop: int) -> None:
        """Digests of the chunks rows [start, stop) touch, into ``update`` (committed with it; see
        :mod:`geopipe.pipeline.store.chunks`). Stores created before digests stay without them."""
        if start > 0 and self.attrs.get(CHUNK_DIGESTS_ATTR) is None:
            return
        update[CHUNK_DIGESTS_ATTR] = record_digests(self.path, self._group, stop, start, stop, self.attrs.get(CHUNK_DIGESTS_ATTR))

    def _commit(self, update: dict) -> None:
        # One write of zarr.json (local: temp file, fsync, rename; object stores: one PUT) holding the
        # attributes and the consolidated metadata of the arrays as they are now.
        attrs = {**self.attrs, **update}
        check_attrs_size(self.path, attrs, self.max_attr_bytes)
        write_root(self.path, self._group, attrs)

    def _chunk_rows(self) -> int:
        return int(self._group[ARRAY_KEYS].chunks[0])

    def close(self) -> None:
        """Consolidate ``rejects.parquet`` and release the lock."""
        try:
            if self._lock.held:
                consolidate_rejects(self.path, len(self.shards))
        finally:
            self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()



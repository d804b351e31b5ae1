"""What other Zarr readers see of a store: checksummed codecs, consolidated metadata in the root
``zarr.json``, the ``rejects`` array node whose folder Zarr never lists, and the housekeeping that
keeps them so — stale temporary files of killed writes, a bound on the group attributes.

Layout and attributes: :mod:`geopipe.schemas.store`. geopipe itself opens stores with
``use_consolidated=False`` (:func:`open_group`): the consolidated metadata is for xarray and plain
Zarr, whose reads of committed rows it describes; the writer's own view must see arrays it has
just resized or created.
"""

from __future__ import annotations

import json
import os
import re
import warnings

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.store import CONSOLIDATED, MAX_ATTR_BYTES, REJECTS_GROUP, REJECTS_NODE_VALUE

__all__ = ["checked", "open_group", "root_json", "write_root", "consolidated_status", "ensure_rejects_node",
           "is_temporary", "stale_temporaries", "remove_stale_temporaries", "check_attrs_size", "GROWING_ATTRS"]

#: Group attributes that grow with the store's shards (not bounded by :data:`MAX_ATTR_BYTES`).
GROWING_ATTRS = frozenset({"shards", "chunk_digests", "rejects", "meta_fields", "meta_text"})
#: Temporary files of atomic writes: geopipe's ``.<name>.<12 hex>.tmp`` (fsio.atomic_path) and
#: zarr-python's ``<stem>.<32 hex>.partial`` (LocalStore).
_TEMPORARY = re.compile(r"^(\..+\.[0-9a-f]{12}\.tmp|.+\.[0-9a-f]{32}\.partial)$")
_STAGING = ".staging"  # the distributed extract's fragments: that machinery's own files
_REJECTS_ATTRS = {
    "long_name": "rejected samples: Parquet tables in this array's folder, not Zarr data",
    "content": "rejects.parquet: every rejected sample; part-<shard index>.parquet: those of one shard "
               "(columns key, shard, reason, detail; geopipe.schemas.rejects)",
}


def checked(codec) -> list:
    """Bytes-to-bytes codecs of a new array: ``codec`` (compression), then a crc32c checksum of the
    compressed bytes that any Zarr v3 reader verifies before decompressing."""
    from zarr.codecs import Crc32cCodec

    return [codec, Crc32cCodec()]


def open_group(path: str, mode: str = "r"):
    """The store's root group as on disk (never through its consolidated metadata)."""
    import zarr

    return zarr.open_group(path, mode=mode, use_consolidated=False)


def _members_metadata(group) -> dict:
    """Flat path → metadata dict of every node below ``group`` (as zarr's consolidation writes it)."""
    from zarr.core.buffer import default_buffer_prototype

    with warnings.catch_warnings():  # foreign files (.lock, .staging, old rejects) are not members
        warnings.simplefilter("ignore")
        members = sorted(group.members(max_depth=None, use_consolidated_for_children=False), key=lambda kv: kv[0])
    out = {}
    for name, node in members:
        data = node.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
        entry = json.loads(data)
        if entry.get("node_type") == "group":
            entry[CONSOLIDATED] = {"kind": "inline", "must_understand": False, "metadata": {}}
        out[name] = entry
    return out


def root_json(group, attrs: dict) -> bytes:
    """The root ``zarr.json`` for ``attrs`` with consolidated metadata of every node as on disk now."""
    doc = {"attributes": attrs, "zarr_format": 3, CONSOLIDATED: {"kind": "inline", "must_understand": False,
                                                                  "metadata": _members_metadata(group)},
           "node_type": "group"}
    return json.dumps(doc, allow_nan=True).encode()  # no indent: the C encoder (the attributes grow with the shards)


def write_root(path: str, group, attrs: dict) -> None:
    """Commit ``attrs`` and the consolidated metadata in one atomic write of ``path/zarr.json``."""
    fsio.write_atomic(fsio.join(path, "zarr.json"), root_json(group, attrs))


def consolidated_status(path: str, group, rows: int) -> tuple[str, list[str]]:
    """How the consolidated metadata on disk describes the store: ("current" | "absent" | "stale",
    problems). Stale entries are problems when a reader trusting them would read other data:
    a node missing or extra, other dtype/chunks/codecs/attributes, or fewer than ``rows`` rows of
    an array; arrays longer than recorded (an append under way or interrupted) are fine."""
    on_disk = json.loads(fsio.read_bytes(fsio.join(path, "zarr.json"))).get(CONSOLIDATED)
    if not on_disk:
        return "absent", []
    now, recorded = _members_metadata(group), on_disk.get("metadata", {})
    problems = [f"consolidated metadata lacks {name!r}" for name in sorted(set(now) - set(recorded))]
    problems += [f"consolidated metadata lists {name!r}, which is not in the store" for name in sorted(set(recorded) - set(now))]
    stale = False
    for name in sorted(set(now) & set(recorded)):
        a, b = dict(now[name]), dict(recorded[name])
        shape_a, shape_b = a.pop("shape", None), b.pop("shape", None)
        if a != b:
            problems.append(f"consolidated metadata of {name!r} differs from its zarr.json")
        elif shape_a != shape_b:
            stale = True
            if not (shape_a and shape_b and len(shape_a) == len(shape_b) and shape_a[1:] == shape_b[1:] and shape_b[0] >= rows):
                problems.append(f"consolidated metadata gives {name!r} shape {shape_b}, the store has {shape_a} ({rows} rows committed)")
    return ("stale" if problems or stale else "current"), problems


def _rejects_node_json() -> bytes:
    """zarr.json of the ``rejects`` node: a 0-d string array that stores nothing (reads as its fill value)."""
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import MemoryStore

    mem: dict = {}
    zarr.create_array(store=MemoryStore(mem), shape=(), dtype=str, fill_value=REJECTS_NODE_VALUE, dimension_names=(),
                      compressors=checked(ZstdCodec(level=3)), attributes=_REJECTS_ATTRS)
    return mem["zarr.json"].to_bytes()


def ensure_rejects_node(path: str) -> bool:
    """Make ``rejects/zarr.json`` the array node (a new store, a store with a ``rejects`` group or
    none); the Parquet files in the folder stay. True when it was written."""
    url = fsio.join(path, REJECTS_GROUP, "zarr.json")
    if fsio.isfile(url):
        try:
            if json.loads(fsio.read_bytes(url)).get("node_type") == "array":
                return False
        except ValueError:
            pass  # unreadable: write it anew
    fsio.write_atomic(url, _rejects_node_json())
    return True


def is_temporary(name: str) -> bool:
    """Whether a file name is that of an atomic write's temporary file (geopipe's or zarr-python's)."""
    return bool(_TEMPORARY.match(name))


def stale_temporaries(path: str, before: float | None = None) -> list[str]:
    """Temporary files that killed atomic writes left in a local store (none for fsspec urls, whose
    writes are single PUTs), modified before ``before`` (seconds since the epoch; None: any).
    The distributed extract's ``.staging`` folder is left to that machinery."""
    if not fsio.is_local(path) or not os.path.isdir(path):
        return []
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not (root == path and d == _STAGING)]
        for name in files:
            if _TEMPORARY.match(name):
                full = os.path.join(root, name)
                try:
                    if before is None or os.stat(full).st_mtime < before:
                        found.append(full)
                except FileNotFoundError:
                    continue  # finished or removed meanwhile
    return sorted(found)


def remove_stale_temporaries(path: str, lock_path: str | None) -> int:
    """Delete the temporary files older than the held writer lock ``lock_path`` (written when it
    was taken, so no live writer owns them); returns how many. Without a lock file (a remote store)
    nothing is removed."""
    if lock_path is None or not os.path.exists(lock_path):
        return 0
    gone = 0
    for full in stale_temporaries(path, before=os.stat(lock_path).st_mtime):
        try:
            os.remove(full)
            gone += 1
        except FileNotFoundError:
            pass
    return gone


def check_attrs_size(path: str, attrs: dict, limit: int = MAX_ATTR_BYTES) -> None:
    """Raise a one-line :class:`GeopipeError` when the attributes that do not grow with the store
    (settings, identities, provenance) exceed ``limit`` bytes of JSON, or a shard url exceeds it:
    every reader parses the root zarr.json, so a huge value slows every later command."""
    sizes = {k: len(json.dumps(v, default=str)) for k, v in attrs.items() if k not in GROWING_ATTRS}
    if sum(sizes.values()) > limit:
        name = max(sizes, key=sizes.get)
        raise GeopipeError(f"store {path}: attribute {name!r} would take {sizes[name] / 2**20:.1f} MiB of the store's "
                           f"zarr.json (limit {limit / 2**20:.1f} MiB for settings and identities); a configuration value, "
                           f"backbone setting or name this large is a mistake: shorten it")
    long = next((url for url in attrs.get("shards", {}) if len(url) > limit), None)
    if long is not None:
        raise GeopipeError(f"store {path}: a shard url of {len(long) / 2**20:.1f} MiB ({long[:60]!r}...) exceeds "
                           f"{limit / 2**20:.1f} MiB; name shards by shorter paths")

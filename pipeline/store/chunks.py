"""Digests of a store's chunks as stored on disk, recorded at commit time and checked before decoding.

The writer records, for every array of the store (``embeddings``, ``latlon``, ``keys``,
``shard``, ``meta/<name>``, and any other array in the group), a digest of each chunk's
*encoded* bytes — the file Zarr wrote — in ``attrs["chunk_digests"]``: array path → chunk key
(``"c/0/0"``) → 16 hex digits of sha256. The digests go into the same atomic ``zarr.json``
write that commits the shard, so they always describe committed chunks. Since they cover the
bytes before decompression, a damaged chunk is found without handing it to a decoder (a
truncated Blosc frame can crash the process instead of raising). Rejects parts carry a digest
of their Parquet bytes in their shard's completion record (``rejects_digest``).

Stores written before digests existed have no ``chunk_digests``; :func:`check_chunks` then
says which arrays are not covered. Decoding chunks that failed their digest (or have none) is
done by :func:`decode_chunks_safely` in a child process, so a decoder crash is a reported
problem, not a crash of ``geopipe store verify``.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
import sys
import warnings
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.schemas.store import CHUNK_DIGESTS_ATTR, REJECTS_GROUP

__all__ = ["CHUNK_DIGESTS_ATTR", "DIGEST_CHARS", "MISSING_CHUNK", "ChunkRef", "bytes_digest", "array_paths", "chunk_refs", "record_digests",
           "restore_last_chunks", "check_chunks", "decode_chunks_safely"]

#: Hex digits kept of each sha256 (64 bits: corruption detection, not an adversary).
DIGEST_CHARS = 16
#: What :func:`check_chunks` says of a recorded chunk whose file is gone (it would read as fill values).
MISSING_CHUNK = "the chunk file is missing"

#: Arrays of the store whose first axis is not the record axis (written once at creation).
_FIXED_ARRAYS = frozenset({"coord"})


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of an array: ``array`` path in the store, ``key`` as stored (``"c/3/0"``), its
    committed rows [``start``, ``stop``) along the record axis (empty for arrays without one)."""

    array: str
    key: str
    start: int
    stop: int


def bytes_digest(data: bytes) -> str:
    """The first :data:`DIGEST_CHARS` hex digits of sha256(data)."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def array_paths(group) -> list[str]:
    """Paths of every array in a store group (``"embeddings"``, ..., ``"meta/<name>"``), sorted; not
    the ``rejects`` node, which holds no data (its folder holds the Parquet files)."""
    with warnings.catch_warnings():  # Zarr warns about the Parquet files it meets in the store
        warnings.simplefilter("ignore")
        members = list(group.members(max_depth=None))
    return sorted(name for name, node in members if hasattr(node, "chunks") and hasattr(node, "shape") and name != REJECTS_GROUP)


def chunk_refs(array, path: str, rows: int, start: int = 0, stop: int | None = None) -> list[ChunkRef]:
    """The chunks of ``array`` (a Zarr array at ``path`` in the store) holding rows [start, stop)
    of the committed [0, rows); an array whose first axis is not the record axis (e.g. a label
    array of fixed length) is covered whole."""
    encode = array.metadata.chunk_key_encoding.encode_chunk_key
    if not array.shape:
        return [ChunkRef(path, encode(()), 0, 0)]
    per = array.chunks[0]
    grid_rest = [range(-(-n // c)) for n, c in zip(array.shape[1:], array.chunks[1:])]
    record_axis = path not in _FIXED_ARRAYS
    if record_axis:
        stop = rows if stop is None else min(stop, rows)
        first, last = start // per, -(-stop // per)
    else:
        first, last = 0, -(-array.shape[0] // per)
    refs = []
    for i in range(first, last):
        lo, hi = (max(i * per, 0), min((i + 1) * per, rows)) if record_axis else (0, 0)
        for rest in itertools.product(*grid_rest):
            refs.append(ChunkRef(path, encode((i, *rest)), lo, hi))
    return refs



def _chunk_url(store: str, ref: ChunkRef) -> str:
    return fsio.join(store, *ref.array.split("/"), *ref.key.split("/"))


def record_digests(store: str, group, rows: int, start: int, stop: int, previous: dict | None) -> dict:
    """``attrs["chunk_digests"]`` after rows [start, stop) were written (committed rows become
    [0, stop)): digests of every chunk those rows touch, re-read from disk, merged into
    ``previous``; chunks of arrays without a record axis are digested once."""
    digests = {name: dict(chunks) for name, chunks in (previous or {}).items()}
    for path in array_paths(group):
        array = group[path]
        known = digests.setdefault(path, {})
        fixed = path in _FIXED_ARRAYS
        if fixed and known:
            continue
        for ref in chunk_refs(array, path, stop, 0 if fixed else start, None if fixed else stop):
            url = _chunk_url(store, ref)
            if fsio.exists(url):
                known[ref.key] = bytes_digest(fsio.read_bytes(url))
            else:  # never written: reads as the fill value
                known.pop(ref.key, None)
        lost = [k for k in known if not fixed and k not in {r.key for r in chunk_refs(array, path, stop)}]
        for key in lost:  # chunks past the committed rows (after a truncation)
            del known[key]
    return digests


def restore_last_chunks(store: str, group, rows: int, digests: dict | None) -> dict | None:
    """An interrupted append rewrote the chunk holding the last committed row (of ``rows``) with
    rows it never committed, so its bytes no longer match the recorded digest: write its committed
    rows back (dropping the rest) in every array longer than ``rows``. Returns the digests to
    commit anew, or None when nothing was rewritten (or the store records no digests)."""
    if digests is None or rows == 0:
        return None
    first = None
    for name in digests:
        arr = group.get(name)
        if arr is None or name in ("coord",) or arr.shape[0] <= rows:
            continue
        start = (rows - 1) // arr.chunks[0] * arr.chunks[0]
        values = arr[start:rows]
        arr.resize((rows, *arr.shape[1:]))
        arr[start:rows] = values
        first = start if first is None else min(first, start)
    return None if first is None else record_digests(store, group, rows, first, rows, digests)


def check_chunks(store: str, group, attrs: dict, only: list[ChunkRef] | None = None) -> tuple[list[tuple[ChunkRef, str]], list[str]]:
    """Compare every committed chunk's bytes (or just the chunks ``only``) with its recorded
    digest, decoding nothing.

    Returns (damaged, uncovered): (chunk, what is wrong) pairs, and the arrays that have no
    recorded digests (stores written before digests, or arrays added outside geopipe).
    """
    rows = int(attrs["rows"])
    recorded = attrs.get(CHUNK_DIGESTS_ATTR) or {}
    damaged, uncovered = [], []
    if only is None:
        refs = []
        for path in array_paths(group):
            if path in recorded:
                refs += chunk_refs(group[path], path, rows)
            else:
                uncovered.append(path)
    else:
        refs = [ref for ref in only if ref.array in recorded]
    for ref in refs:
        want = recorded[ref.array].get(ref.key)
        try:
            data = fsio.read_bytes(_chunk_url(store, ref))
        except FileNotFoundError:
            if want is not None:
                damaged.append((ref, MISSING_CHUNK))
            continue
        if want is None:
            damaged.append((ref, "a chunk exists that no commit recorded"))
        elif bytes_digest(data) != want:
            damaged.append((ref, f"its bytes ({len(data)}) differ from the digest recorded when it was committed"))
    return damaged, uncovered


_DECODER = r"""
import sys, zarr
store, todo = sys.argv[1], [line.split("\t") for line in sys.stdin.read().splitlines() if line]
group = zarr.open_group(store, mode="r", use_consolidated=False)
for path, start, stop in todo:
    print("start", flush=True)
    try:
        arr = group[path]
        if int(stop) > int(start):
            arr[int(start):int(stop)]
        else:
            arr[...]
        print("ok", flush=True)
    except Exception as exc:
        print("error " + (type(exc).__name__ + ": " + str(exc)).replace("\n", " ")[:300], flush=True)
"""


def decode_chunks_safely(store: str, refs: list[ChunkRef], timeout_s: float = 600.0) -> dict[ChunkRef, str]:
    """Decode each chunk's rows in a child process; chunk → what went wrong ("" = decoded).

    A decoder that crashes the child (a signal) marks that chunk and the child is restarted
    for the rest, so one bad chunk cannot take ``geopipe store verify`` down with it.
    """
    out: dict[ChunkRef, str] = {}
    todo = list(refs)
    while todo:
        text = "".join(f"{r.array}\t{r.start}\t{r.stop}\n" for r in todo)
        proc = subprocess.run([sys.executable, "-c", _DECODER, store], input=text, capture_output=True, text=True, timeout=timeout_s)
        lines = proc.stdout.splitlines()
        replies = [line for line in lines if line != "start"]
        for ref, reply in zip(todo, replies):
            out[ref] = "" if reply == "ok" else f"decoding fails ({reply[6:]})"
        done = len(replies)
        if done < len(todo) and lines.count("start") > done:  # crashed inside this chunk's decoder
            why = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
            out[todo[done]] = f"decoding crashes the decoder ({why})"
            done += 1
        elif done < len(todo):
            raise RuntimeError(f"chunk decoder failed before decoding: {proc.stderr.strip()[-500:]}")
        todo = todo[done:]
    return out


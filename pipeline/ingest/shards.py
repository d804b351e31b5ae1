"""WebDataset shards: resolving patterns, change detection and fault-tolerant tar iteration.

A shard is a POSIX tar whose members ``<key>.<ext>`` are grouped into samples by key
(webdataset's convention: the key is the member path up to the first dot of its basename,
the extension the rest, lower-cased). Local paths, globs and brace patterns
(``data/train-{000000..000003}.tar``) are supported, plus ``proto://`` urls through fsspec
(``s3://``, ``https://``, ``memory://``; ``file://`` urls become local paths).
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.limits import MAX_MEMBER_BYTES
from geopipe.pipeline.store.format import ShardStat

__all__ = [
    "ShardNotFoundError",
    "CorruptShardError",
    "resolve_shards",
    "shard_stat",
    "file_sha256",
    "iter_tar_samples",
    "write_shards",
]

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_META_KEY = re.compile(r"^__[^/]*__$")
_BLOCK = 512


class ShardNotFoundError(GeopipeError):
    """A shard path or pattern that matches no file."""


class CorruptShardError(Exception):
    """A tar that ended early or could not be read; samples before the break were yielded.

    ``last_key`` is the key of the last complete sample ("" if none), ``detail`` one line.
    """

    def __init__(self, last_key: str, detail: str):
        super().__init__(detail)
        self.last_key = last_key
        self.detail = detail


def _is_remote(url: str) -> bool:
    return not fsio.is_local(url)


def _expand_one(path: str) -> list[str]:
    path = fsio.normalize(path)
    if _is_remote(path):
        fs, p = fsio.url_to_fs(path)
        found = sorted(fs.glob(p)) if glob.has_magic(p) else ([p] if fs.isfile(p) else [])
        return [fs.unstrip_protocol(m) for m in found]
    if glob.has_magic(path):
        return [os.path.abspath(m) for m in sorted(glob.glob(path)) if os.path.isfile(m)]
    return [os.path.abspath(path)] if os.path.isfile(path) else []


def resolve_shards(patterns: Sequence[str]) -> list[str]:
    """Expand brace patterns and globs into shard urls (absolute paths for local files).

    Order: patterns in the given order, brace alternatives in order, glob matches sorted;
    repeated shards are kept once (first position). Raises :class:`ShardNotFoundError` for a
    path or pattern that matches no file.
    """
    from braceexpand import braceexpand

    if isinstance(patterns, str):
        patterns = [patterns]
    urls: dict[str, None] = {}
    for pattern in patterns:
        for path in braceexpand(pattern):
            found = _expand_one(path)
            if not found:
                raise ShardNotFoundError(f"shard not found: {path} (check the path or brace pattern)")
            urls.update(dict.fromkeys(found))
    return list(urls)


def shard_stat(url: str) -> ShardStat:
    """Current size and mtime of a shard (used to detect shards changed since extraction)."""
    if not _is_remote(url):
        st = os.stat(fsio.normalize(url))
        return ShardStat(int(st.st_size), float(st.st_mtime))
    fs, p = fsio.url_to_fs(url)
    info = fs.info(p)
    mtime = info.get("mtime")
    return ShardStat(int(info.get("size") or 0), float(mtime) if isinstance(mtime, (int, float)) else None)


def file_sha256(url: str) -> str:
    """sha256 hex of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with fsio.open_read(url) as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class _Hashing:
    """Read-only file wrapper feeding every byte of the file, once and in order, to ``digest``.

    Bytes are hashed up to the furthest position read; a backward seek re-reads without
    re-hashing and :meth:`finish` hashes whatever was never read, so the digest is the file's.
    """

    def __init__(self, raw, digest):
        self.raw, self.digest, self.pos, self.hashed = raw, digest, 0, 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        end = self.pos + len(data)
        if end > self.hashed:
            self.digest.update(memoryview(data)[self.hashed - self.pos:])
            self.hashed = end
        self.pos = end
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: offset, 1: self.pos + offset}.get(whence)
        if target is None or target > self.hashed:  # never used by tarfile's stream mode
            raise OSError("unsupported seek while hashing a shard")
        self.pos = self.raw.seek(target)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def finish(self) -> None:
        self.seek(self.hashed)
        while self.read(1 << 20):
            pass


def _split(name: str) -> tuple[str | None, str]:
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _has_end_marker(fh, offset: int) -> bool:
    """True when the bytes after the last member are at least one block of zeros (end of archive).

    tarfile ends silently when a header block is cut or missing, so a tar truncated at a member
    boundary would otherwise look complete.
    """
    fh.seek(offset)
    total = 0
    while chunk := fh.read(1 << 16):
        if chunk.count(0) != len(chunk):
            return False
        total += len(chunk)
    return total >= _BLOCK


class _CutMember(Exception):
    """The data of member ``name`` could not be read in full (its header was)."""

    def __init__(self, name: str, exc: BaseException):
        super().__init__(f"member {name!r}: {type(exc).__name__}: {exc}")
        self.name = name


class _TooLarge:
    """Stands for a member skipped unread because its header size is over the limit."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit

    def detail(self, name: str) -> str:
        return (f"member {name!r} is {self.size / 2**20:.1f} MiB decompressed, over the {self.limit / 2**20:.0f} MiB "
                f"limit (raise it with --max-member-mb)")


def _skip(stream, info, block: int = 4 << 20) -> None:
    """Read past member ``info``'s data in blocks (tarfile's own forward seek in stream mode reads
    10 KiB at a time and re-joins its decompressed buffer each time: hours for a GiB of zeros)."""
    try:
        member = stream.extractfile(info)
        while member.read(block):
            pass
    except Exception as exc:
        raise _CutMember(info.name, exc) from None


def _members(fh, limit: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes | _TooLarge]]:
    """(name, bytes) of each regular member in order — a :class:`_TooLarge` instead of the bytes of
    a member whose header says it is over ``limit`` bytes (skipped in blocks, never held); raises
    on a broken or truncated stream."""
    stream = tarfile.open(fileobj=fh, mode="r|*")
    for info in stream:
        if info.isreg():
            if info.size > limit:
                _skip(stream, info)
                yield info.name, _TooLarge(info.size, limit)
                stream.members = []
                continue
            try:
                data = stream.extractfile(info).read()
            except Exception as exc:
                raise _CutMember(info.name, exc) from None
            yield info.name, data
        stream.members = []  # stream mode keeps every TarInfo otherwise
    compressed = getattr(stream.fileobj, "comptype", "tar") != "tar"
    if not compressed and not _has_end_marker(fh, stream.offset):  # compressors detect truncation themselves
        raise tarfile.ReadError(f"no end-of-archive marker after byte {stream.offset} (tar truncated)")


def _starts_new(sample: dict | None, key: str, ext: str) -> bool:
    return sample is not None and (key != sample["__key__"] or ext in sample)


class _Grouper:
    """Groups (name, bytes) members into samples; keeps the sample being filled and the last key yielded."""

    def __init__(self):
        self.current: dict | None = None
        self.last_key = ""

    def feed(self, members) -> Iterator[dict]:
        for name, data in members:
            key, ext = _split(name)
            if key is None or _META_KEY.match(os.path.basename(key)) or ext.startswith("__"):
                continue  # shard metadata; an entry named like the reader's own __error__/__url__ fields
            if _starts_new(self.current, key, ext):
                done, self.current = self.current, None
                self.last_key = done["__key__"]
                yield done
            if self.current is None:
                self.current = {"__key__": key}
            if isinstance(data, _TooLarge):  # the sample is a reject; its entry stays empty
                self.current.setdefault("__error__", ("member_too_large", data.detail(name)))
                data = b""
            self.current[ext] = data


def iter_tar_samples(url: str, info: dict | None = None, max_member: int = MAX_MEMBER_BYTES) -> Iterator[dict]:
    """Yield the samples of one shard in tar order: ``{"__key__": key, ext: bytes, ...}``.

    Consecutive members with the same key form one sample; a key reappearing with an
    extension it already has starts a new sample (reported downstream as a duplicate key).
    Members with ``__*__`` keys (shard metadata) and non-regular entries are skipped. When the
    tar is unreadable or ends early, the sample at the break is dropped unless the break lies
    in a later sample's member, and :class:`CorruptShardError` is raised after every complete
    sample before it was yielded. info: a dict that receives ``info["sha256"]``, the sha256
    hex of the file's bytes hashed while reading (None when the file itself could not be read
    to the end), once the generator is exhausted. max_member: a member whose tar header says it
    is over this many bytes (decompressed) is skipped unread and its sample carries
    ``__error__`` ("member_too_large", detail naming the limit) — memory stays bounded whatever
    a hostile tar declares.
    """
    group, error = _Grouper(), None
    if info is not None:
        info["sha256"] = None
    try:
        with fsio.open_read(url) as raw:
            fh = _Hashing(raw, hashlib.sha256()) if info is not None else raw
            try:
                yield from group.feed(_members(fh, max_member))
            except Exception as exc:  # a broken tar: the file itself may still be readable to the end
                error = exc
            if info is not None:
                fh.finish()
                info["sha256"] = fh.digest.hexdigest()
    except Exception as exc:  # any read failure is a data-plane fault of this shard
        error = error or exc
    current, last_key = group.current, group.last_key
    if error is None:
        if current is not None:
            yield current
        return
    detail = f"{type(error).__name__}: {error}"
    if isinstance(error, _CutMember):
        detail, (key, ext) = str(error), _split(error.name)
        if _starts_new(current, key, ext):
            yield current  # the cut member belongs to the next sample: this one is complete
            last_key, current = current["__key__"], None
        current = current or ({"__key__": key} if key else None)
    partial = f"; incomplete sample {current['__key__']!r} dropped" if current else ""
    detail = " ".join(detail.split())[:300]
    raise CorruptShardError(last_key, f"tar ended early after sample {last_key!r} ({detail}){partial}")


# --------------------------------------------------------------------------- writing (webdataset's TarWriter)


def write_shards(out_dir: str | os.PathLike, samples: Iterable[dict], prefix: str, shard_size: int) -> list[str]:
    """Write samples to WebDataset tars ``{out_dir}/{prefix}-000000.tar``, ``-000001.tar``, …

    samples: dicts like ``{"__key__": str, "jpg": bytes, "json": dict | bytes}``; any entry
        may be omitted (a missing ``__key__`` becomes ``f"{prefix}_{i:08d}"``) and other
        extensions (``"npy"``, ``"cls"``, …) are allowed. bytes are written as-is (so corrupt
        JPEGs or invalid JSON can be written on purpose); str is UTF-8; a dict/list/number
        under a ``json`` extension is ``json.dumps``-ed (NaN allowed); a numpy array under
        ``npy`` is ``np.save``-d. Keys must not contain "." (WebDataset splits on it).
    shard_size: samples per tar (> 0). Tars are byte-reproducible (fixed mtime) and written
        atomically (temporary name, then rename). Returns the paths written, in order.
    """
    check_int(shard_size, "shard_size", 1)
    if not prefix or "/" in prefix or "." in prefix:
        raise ConfigError(f"shard prefix must be a non-empty file-name stem, got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    stream, start = iter(samples), 0
    while chunk := list(itertools.islice(stream, shard_size)):
        encoded = [_encode_sample(s, start + j, prefix) for j, s in enumerate(chunk)]
        paths.append(_write_tar(out / f"{prefix}-{len(paths):06d}.tar", encoded))
        start += len(chunk)
    return paths


def _write_tar(path: Path, encoded: list[dict]) -> str:
    """A WebDataset shard written by webdataset's own ``TarWriter`` (members ``<key>.<ext>``,
    mtime 0, so the demo world is byte-identical from run to run)."""
    import webdataset as wds

    with fsio.atomic_path(str(path)) as tmp:
        with open(tmp, "wb") as handle, wds.TarWriter(handle, encoder=False, mtime=0.0) as writer:
            for sample in encoded:
                writer.write(sample)
    return str(path)


def _encode_sample(sample: dict, index: int, prefix: str) -> dict:
    if not isinstance(sample, dict):
        raise ValueError(f"sample {index} of {prefix!r} must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__", f"{prefix}_{index:08d}")
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"sample {index} of {prefix!r}: __key__ must be a non-empty str without '.', got {key!r}")
    encoded: dict[str, Any] = {"__key__": key}
    for ext, value in sample.items():
        if ext == "__key__":
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            encoded[ext] = bytes(value)
        elif isinstance(value, str):
            encoded[ext] = value.encode("utf-8")
        elif ext.endswith("json"):
            encoded[ext] = json.dumps(value, sort_keys=True).encode("utf-8")
        elif ext.endswith("npy") and isinstance(value, np.ndarray):
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            encoded[ext] = buf.getvalue()
        else:
            raise ValueError(f"sample {key!r}: cannot encode {ext!r} of type {type(value).__name__}; pass bytes")
    return encoded

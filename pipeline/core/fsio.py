"""Local paths and fsspec urls behind one small set of file operations.

A location is either a local path or a ``proto://`` url handled by fsspec (``s3://``,
``gs://``, ``https://``, ``memory://``, ...). ``file://`` urls are turned into local paths by
:func:`normalize`, so local files always get local semantics: atomic renames and the store's
lock file. Credentials and options of remote filesystems come from fsspec's own configuration
(``FSSPEC_<PROTOCOL>_<OPTION>`` environment variables or ``~/.config/fsspec/``), never from
geopipe.

Atomicity: :func:`write_atomic` writes a temporary file and renames it locally; on object
stores one PUT is already all-or-nothing, so it writes the object directly.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO

from geopipe.pipeline.core.errors import GeopipeError

__all__ = [
    "OutputPathError",
    "normalize",
    "is_local",
    "url_to_fs",
    "join",
    "exists",
    "isfile",
    "listdir",
    "makedirs",
    "remove",
    "read_bytes",
    "write_atomic",
    "temporary_beside",
    "atomic_path",
    "open_read",
    "disk_usage",
]

_FILE = "file://"


class OutputPathError(GeopipeError, OSError):
    """An output that cannot be created (a missing parent on a read-only or virtual filesystem such
    as ``/proc``, no permission, a file in the way); one line naming the path. Also an
    ``OSError``, so callers that handle file-system errors keep catching it."""


def _cannot_create(url: str, exc: OSError, what: str) -> OutputPathError:
    reason = exc.strerror or type(exc).__name__
    return OutputPathError(f"cannot create {what} {url}: {reason}; choose a writable location")


def normalize(url: str) -> str:
    """``file:///a/b`` → ``/a/b``; other urls and local paths unchanged (``os.fspath`` applied)."""
    url = os.fspath(url)
    return url[len(_FILE):] if url.startswith(_FILE) else url


def is_local(url: str) -> bool:
    """True for local paths (and ``file://`` urls), False for other ``proto://`` urls."""
    return "://" not in normalize(url)


def url_to_fs(url: str):
    """(fsspec filesystem, path within it) of a remote url."""
    import fsspec  # only for proto:// urls

    return fsspec.core.url_to_fs(url)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` with ``os.path.join`` locally and "/" for urls."""
    base = normalize(base)
    if is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *parts])


def exists(url: str) -> bool:
    url = normalize(url)
    if is_local(url):
        return os.path.exists(url)
    fs, path = url_to_fs(url)
    return fs.exists(path)


def isfile(url: str) -> bool:
    url = normalize(url)
    if is_local(url):
        return os.path.isfile(url)
    fs, path = url_to_fs(url)
    return fs.isfile(path)


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries of a directory; [] when it does not exist."""
    url = normalize(url)
    if is_local(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs, path = url_to_fs(url)
    if not fs.isdir(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def makedirs(url: str, what: str = "folder") -> None:
    """Create the folder ``url`` and its parents (nothing when it exists); :class:`OutputPathError`
    ("cannot create <what> <url>: <reason>") when it cannot be created — the one place outputs'
    folders are made."""
    url = normalize(url)
    try:
        if is_local(url):
            os.makedirs(url, exist_ok=True)
        else:
            fs, path = url_to_fs(url)
            fs.makedirs(path, exist_ok=True)
    except OutputPathError:
        raise
    except OSError as exc:
        raise _cannot_create(url, exc, what) from None


def remove(url: str) -> None:
    """Delete a file; a missing file is not an error."""
    url = normalize(url)
    try:
        if is_local(url):
            os.unlink(url)
        else:
            fs, path = url_to_fs(url)
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def read_bytes(url: str) -> bytes:
    url = normalize(url)
    if is_local(url):
        with open(url, "rb") as fh:
            return fh.read()
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def write_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see the old content or the new one, never half of it."""
    url = normalize(url)
    if not is_local(url):
        fs, path = url_to_fs(url)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, data)
        return
    with atomic_path(url) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def temporary_beside(path: str) -> str:
    """Create (empty) and return ``.<name>.<12 hex>.tmp`` in the folder of the local ``path``,
    making the folder first: the one place an output's file is first created, so a location that
    cannot take it is :class:`OutputPathError` naming ``path`` (never a traceback from a writer)."""
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(tmp, "xb").close()
    except OSError as exc:
        raise _cannot_create(path, exc, "file") from None
    return tmp


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """A temporary local path beside ``path`` to write into; on a clean exit it is fsynced and
    renamed over ``path`` in one step (readers, and a process killed mid-write, see the old file
    or the new one, never half of it); on an error it is removed and ``path`` is untouched."""
    path = os.path.abspath(path)
    tmp = temporary_beside(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_read(url: str) -> IO[bytes]:
    """A binary file object (seekable) for reading."""
    url = normalize(url)
    if is_local(url):
        return open(url, "rb")
    fs, path = url_to_fs(url)
    return fs.open(path, "rb")


def disk_usage(url: str) -> int:
    """Total bytes of the files under a directory (or of one file)."""
    url = normalize(url)
    if not is_local(url):
        fs, path = url_to_fs(url)
        return int(fs.du(path, total=True))
    if os.path.isfile(url):
        return os.path.getsize(url)
    total = 0
    for root, _, files in os.walk(url):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed meanwhile (a writer's temporary file)
                pass
    return total

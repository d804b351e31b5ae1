"""An exclusive lock file holding the owner's pid, for single-writer directories (stores).

Created with ``O_CREAT | O_EXCL`` so two processes cannot both create it; a lock left by a
process that no longer exists on this host (``kill -9``, power loss) is taken over. Local
filesystems only: object stores have no exclusive create, so stores behind fsspec urls get a
:class:`NullLock` (see :meth:`geopipe.pipeline.store.writer.StoreWriter.lock`).
"""

from __future__ import annotations

import os
import socket

from geopipe.pipeline.core.errors import GeopipeError

__all__ = ["LockedError", "DirLock", "NullLock"]


class LockedError(GeopipeError):
    """The directory is locked by another live process."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_owner(path: str) -> tuple[int | None, str]:
    try:
        with open(path) as fh:
            parts = fh.read().split()
    except OSError:
        return None, ""
    pid = int(parts[0]) if parts and parts[0].isdigit() else None
    return pid, parts[1] if len(parts) > 1 else ""


class DirLock:
    """``<directory>/.lock`` containing ``"<pid> <hostname>"``; use as a context manager or acquire/release."""

    def __init__(self, directory: str, name: str = ".lock"):
        self.path = os.path.join(directory, name)
        self.held = False

    def acquire(self) -> "DirLock":
        """Take the lock or raise :class:`LockedError` at once (never waits)."""
        host = socket.gethostname()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid, owner_host = _read_owner(self.path)
                stale = pid is not None and owner_host == host and not _pid_alive(pid)
                if not stale:
                    who = f"process {pid} on {owner_host or 'an unknown host'}" if pid else "another process"
                    raise LockedError(
                        f"{os.path.dirname(self.path)} is locked by {who} (another extract is writing it); "
                        f"wait for it, or delete {self.path} if that process is gone"
                    ) from None
                try:  # stale: the owner died without releasing; take it over
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()} {host}\n")
            self.held = True
            return self
        raise LockedError(f"could not take the lock {self.path}; another process keeps recreating it")

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if self.held:
            pid, _ = _read_owner(self.path)
            if pid == os.getpid():
                os.unlink(self.path)
            self.held = False

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class NullLock:
    """A lock that locks nothing, for directories on object stores (no ``O_EXCL`` there).

    Same interface as :class:`DirLock`; the caller is responsible for warning the user that
    concurrent writers are not detected.
    """

    def __init__(self, directory: str):
        self.path = directory
        self.held = False

    def acquire(self) -> "NullLock":
        self.held = True
        return self

    def release(self) -> None:
        self.held = False

    def __enter__(self) -> "NullLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

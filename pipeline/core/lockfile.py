"""An exclusive lock on a single-writer directory (a store): ``<directory>/.lock``.

The lock is a :class:`filelock.FileLock` (``flock``): the kernel drops it when its process
ends, however it ends (``kill -9``, a crash), so a dead writer never leaves a stale lock. The
holder writes ``"<pid> <hostname>"`` into the file so a refused writer can say who holds it,
and removes the file on release. Local filesystems only: object stores have no locks, so
stores behind fsspec urls get a :class:`NullLock` (see
:meth:`geopipe.pipeline.store.writer.StoreWriter.lock`).
"""

from __future__ import annotations

import os
import socket

from geopipe.pipeline.core.errors import GeopipeError

__all__ = ["LockedError", "DirLock", "NullLock", "writer_note"]


class LockedError(GeopipeError):
    """The directory is locked by another live process."""


def _read_owner(path: str) -> tuple[int | None, str]:
    try:
        with open(path) as fh:
            parts = fh.read().split()
    except OSError:
        return None, ""
    pid = int(parts[0]) if parts and parts[0].isdigit() else None
    return pid, parts[1] if len(parts) > 1 else ""


def writer_note(directory: str, name: str = ".lock") -> str:
    """"; being written by process N on HOST right now: wait for it to finish" when a live writer
    holds ``directory``'s lock (checked by pid on this host, trusted from another), else "" —
    for messages about a store that looks empty or incomplete because it is still being written."""
    if "://" in directory:
        return ""
    pid, host = _read_owner(os.path.join(directory, name))
    if pid is None:
        return ""
    if host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return ""  # a writer killed before it could remove the file: nobody is writing
        except PermissionError:
            pass
    return f"; it is being written by process {pid} on {host or 'an unknown host'} right now: wait for that run to finish"


class DirLock:
    """``<directory>/.lock`` held with ``flock``; use as a context manager or acquire/release."""

    def __init__(self, directory: str, name: str = ".lock", *, target: str | None = None,
                 holder: str = "another extract or import is writing it"):
        self.path = os.path.join(directory, name)
        self.target = target or directory  # what a refusal names
        self.holder = holder  # what the holder is doing, in a refusal
        self.held = False
        self._lock = None
        self._inode: int | None = None

    def _owned(self, fd: int) -> None:
        """Runs once the flock is taken: record who holds it (for the refused writer's message)."""
        self._inode = os.fstat(fd).st_ino
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def acquire(self) -> DirLock:
        """Take the lock or raise :class:`LockedError` at once (never waits)."""
        import filelock

        try:  # a folder that takes no file is not "locked by another process": say so in one line
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError as exc:
            from geopipe.pipeline.core.fsio import OutputPathError

            raise OutputPathError(f"cannot create {self.target}: its lock file {self.path} cannot be made "
                                  f"({exc.strerror or exc}); choose a writable location") from None
        for _ in range(3):
            lock = filelock.FileLock(self.path, timeout=0, thread_local=False, fallback_to_soft=False, on_acquired=self._owned)
            try:
                lock.acquire()
            except filelock.Timeout:
                pid, host = _read_owner(self.path)
                who = f"process {pid} on {host or 'an unknown host'}" if pid else "another process"
                raise LockedError(f"{self.target} is locked by {who} ({self.holder}); wait for it to finish") from None
            try:  # a releasing holder may have removed the file we locked: then lock the new one
                same = os.stat(self.path).st_ino == self._inode
            except FileNotFoundError:
                same = False
            if same:
                self._lock, self.held = lock, True
                return self
            lock.release()
        raise LockedError(f"could not take the lock {self.path}; other processes keep taking and releasing it")

    def release(self) -> None:
        """Remove the lock file and drop the lock, if this process holds it."""
        if self.held:
            try:
                os.unlink(self.path)  # before unlocking: a waiter then retries on a new file
            except FileNotFoundError:
                pass
            self._lock.release()
            self._lock, self.held = None, False

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class NullLock:
    """A lock that locks nothing, for directories on object stores (no locks there).

    Same interface as :class:`DirLock`; the caller is responsible for warning the user that
    concurrent writers are not detected.
    """

    def __init__(self, directory: str):
        self.path = directory
        self.held = False

    def acquire(self) -> NullLock:
        self.held = True
        return self

    def release(self) -> None:
        self.held = False

    def __enter__(self) -> NullLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

"""Worker processes that end with the process that started them (Linux: parent-death signal).

A killed ``geopipe extract`` must not leave its forkserver and decode workers running (each holds
a backbone preprocessing pipeline and decoded images). Three pieces:

- :func:`die_with_parent` in a worker asks the kernel for SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``) and, where that is unavailable or the parent is not the process
  to follow (a forkserver started by someone else), watches ``owner`` with a daemon thread;
- :func:`forkserver_dies_with_owner`, called before the first forkserver-context pool starts,
  makes the multiprocessing forkserver itself die with this process: the forkserver imports this
  module (preload) and, finding the owner's pid in :data:`OWNER_ENV` equal to its parent's,
  sets its parent-death signal, and every child it forks sets one right after the fork (before
  it reads its task from the owner). Importing the module anywhere else does nothing;
- :func:`terminate_on_sigterm` turns SIGTERM into ``SystemExit`` in the main thread, so pools
  and DataLoader workers are shut down by their normal clean-up.

The multiprocessing resource tracker exits by itself once every process holding its pipe
(this one, the forkserver, the workers) is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["OWNER_ENV", "die_with_parent", "forkserver_dies_with_owner", "terminate_on_sigterm"]

#: Environment variable holding the pid of the process whose forkserver must die with it.
OWNER_ENV = "GEOPIPE_FORKSERVER_OWNER"
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> bool:
    """SIGKILL this process when its parent thread exits; False where prctl is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(pid: int, interval_s: float) -> None:
    while _alive(pid) and os.getppid() != 1:
        time.sleep(interval_s)
    os._exit(1)


def die_with_parent(owner: int | None = None, *, expected_parent: int | None = None, interval_s: float = 0.5) -> None:
    """Make this (worker) process exit when its parent dies, and when ``owner`` (a pid) dies.

    expected_parent: the parent's pid when known; a parent already gone before the signal was
    set (a race) ends the process at once.
    """
    armed = _set_pdeathsig()
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(1)
    if owner is not None or not armed:
        threading.Thread(target=_watch, args=(owner if owner is not None else os.getppid(), interval_s),
                         name="geopipe-die-with-owner", daemon=True).start()


def forkserver_dies_with_owner() -> None:
    """Have the forkserver (when this call starts it) die with the current process; see the module
    docstring. Harmless when the forkserver is already running or on non-Linux systems."""
    import multiprocessing.forkserver as fs

    os.environ[OWNER_ENV] = str(os.getpid())
    modules = list(getattr(fs._forkserver, "_preload_modules", []) or [])
    if __name__ not in modules:
        fs.set_forkserver_preload(modules + [__name__])


@contextlib.contextmanager
def terminate_on_sigterm():
    """Within the block, SIGTERM raises ``SystemExit(128 + SIGTERM)`` in the main thread (so
    ``finally`` clauses shut worker pools down); the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _follow_forkserver() -> None:
    """In a child the forkserver just forked: die with the forkserver (the signal is not inherited
    across fork), or at once if it is already gone. Runs before the child reads anything from the
    owner, so a worker forked just before the owner was killed does not wait for it forever."""
    if _set_pdeathsig() and os.getppid() != _FORKSERVER_PID:
        os._exit(1)


_FORKSERVER_PID = os.getpid()
# Preloaded by the forkserver: follow the owner (our parent) when asked to, and have every child
# it forks follow the forkserver. Anywhere else the variable is unset or names another process
# than our parent, and nothing happens.
if os.environ.get(OWNER_ENV) == str(os.getppid()) and "multiprocessing.forkserver" in sys.modules:
    _set_pdeathsig()
    os.register_at_fork(after_in_child=_follow_forkserver)

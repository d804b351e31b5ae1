"""A Dask worker plugin that keeps a worker's own shutdown quiet.

A worker closing while one of its heartbeats is still in flight sees the scheduler connection
close under it and logs "Failed to communicate with scheduler during heartbeat" with a
traceback — after a run that succeeded (seen on a loaded 2-core machine when a LocalCluster
shuts down). The filter drops exactly that record, and only once the worker is closing; the
same failure while the worker runs is still logged.
"""

from __future__ import annotations

import logging

from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

__all__ = ["CLOSING", "ClosingHeartbeatFilter", "QuietWorkerClose"]

#: Worker states in which a failed heartbeat is part of shutting down.
CLOSING = frozenset({Status.closing, Status.closing_gracefully, Status.closed, Status.stopping, Status.stopped})
_MESSAGE = "Failed to communicate with scheduler during heartbeat"


class ClosingHeartbeatFilter(logging.Filter):
    """Drops the failed-heartbeat record of ``worker`` while it is closing."""

    def __init__(self, worker):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith(_MESSAGE) and getattr(self.worker, "status", None) in CLOSING)


class QuietWorkerClose(WorkerPlugin):
    """Installs :class:`ClosingHeartbeatFilter` on the ``distributed.worker`` logger of each worker."""

    name = "geopipe-quiet-worker-close"
    idempotent = True

    def setup(self, worker) -> None:
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, ClosingHeartbeatFilter) and f.worker is worker for f in logger.filters):
            logger.addFilter(ClosingHeartbeatFilter(worker))

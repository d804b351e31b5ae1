"""The worker plugin that keeps a worker's own shutdown quiet drops only the failed-heartbeat
record, and only while the worker is closing."""

import logging
import types

from distributed.core import Status

from geopipe.pipeline.core.dask_quiet import ClosingHeartbeatFilter, QuietWorkerClose


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, None, None)


def test_filter_drops_the_heartbeat_failure_of_a_closing_worker_only():
    worker = types.SimpleNamespace(status=Status.running)
    f = ClosingHeartbeatFilter(worker)
    heartbeat = _record("Failed to communicate with scheduler during heartbeat.")
    assert f.filter(heartbeat)  # while running it is a real problem: kept
    worker.status = Status.closing
    assert not f.filter(heartbeat)
    assert f.filter(_record("Unexpected exception during heartbeat. Closing worker."))  # anything else: kept


def test_plugin_installs_one_filter_per_worker():
    logger = logging.getLogger("distributed.worker")
    worker = types.SimpleNamespace(status=Status.running)
    before = list(logger.filters)
    try:
        plugin = QuietWorkerClose()
        plugin.setup(worker)
        plugin.setup(worker)
        added = [f for f in logger.filters if f not in before]
        assert len(added) == 1 and isinstance(added[0], ClosingHeartbeatFilter) and added[0].worker is worker
    finally:
        logger.filters[:] = before

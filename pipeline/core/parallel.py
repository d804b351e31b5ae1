"""Fan-out of independent partitions: in this process, or on a Dask cluster.

``spec`` names where partitions run: None (in process), ``"local:N"`` (a ``LocalCluster`` of
N single-threaded worker processes, N ≥ 1) or a scheduler address (``tcp://host:8786``).
Results come back in submission order, so the output never depends on how many workers ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

from geopipe.pipeline.core.errors import GeopipeError

__all__ = ["parse_dask_spec", "dask_client", "map_partitions"]

_CONNECT_TIMEOUT_S = 20


def parse_dask_spec(spec: str) -> tuple[str, int | str]:
    """``("local", n_workers)`` or ``("address", address)``; GeopipeError for a malformed spec."""
    spec = str(spec).strip()
    if spec == "local" or spec.startswith("local:"):
        raw = spec.split(":", 1)[1] if ":" in spec else "2"
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise GeopipeError(f"--dask {spec!r}: local:N needs a whole number of workers N ≥ 1, e.g. local:2")
        return "local", n
    if "://" not in spec and ":" not in spec:
        raise GeopipeError(f"--dask {spec!r} is neither local:N nor a scheduler address such as tcp://host:8786")
    proto, _, rest = spec.rpartition("://")
    if proto in ("", "tcp", "tls"):
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise GeopipeError(f"--dask {spec!r}: a scheduler address is host:port with a port number, e.g. tcp://host:8786")
    return "address", spec


def _check_reachable(address: str) -> None:
    """Fail at once, in one line, when a tcp scheduler address names an unknown host or a port
    nothing listens on (instead of waiting for the client's connect timeout)."""
    import socket

    proto, _, rest = address.rpartition("://")
    if proto not in ("", "tcp"):
        return
    host, _, port = rest.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except socket.gaierror:
        raise GeopipeError(f"--dask {address!r}: unknown host {host!r}; give a scheduler address such as tcp://host:8786 "
                           f"or use --dask local:N") from None
    except OSError as exc:
        raise GeopipeError(f"--dask {address!r}: no Dask scheduler at {host}:{port} ({exc.strerror or type(exc).__name__}); "
                           f"start one with `dask scheduler` or use --dask local:N") from None


@contextlib.contextmanager
def dask_client(spec: str, *, threads_per_worker: int = 1) -> Iterator[object]:
    """A ``distributed.Client`` for ``spec``, closed (with its LocalCluster) on exit."""
    from dask.distributed import Client, LocalCluster

    kind, value = parse_dask_spec(spec)
    cluster = None
    try:
        if kind == "local":
            # no dashboard; the scheduler's metrics endpoint on a free port (8787 may be taken)
            cluster = LocalCluster(n_workers=value, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None,
                                   scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
            client = Client(cluster)
        else:
            _check_reachable(value)
            try:
                client = Client(value, timeout=f"{_CONNECT_TIMEOUT_S}s")
            except (OSError, TimeoutError) as exc:
                raise GeopipeError(f"--dask {value!r}: no Dask scheduler answered within {_CONNECT_TIMEOUT_S} s "
                                   f"({type(exc).__name__}); start one with `dask scheduler` or use --dask local:N") from None
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            _close_local_cluster(cluster)


#: Seconds a LocalCluster worker gets to exit (a loaded machine takes longer than Dask's 4 s).
_WORKER_EXIT_S = 60


async def _close_workers(cluster, timeout: float) -> None:
    import asyncio

    await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())))


def _close_local_cluster(cluster) -> None:
    """Close the workers with a generous timeout, then the cluster: Dask's own close kills a
    worker still exiting after 4 s and logs a warning, which a busy machine triggers."""
    try:
        cluster.sync(_close_workers, cluster, _WORKER_EXIT_S)
    finally:
        cluster.close()


def map_partitions(fn: Callable, parts: Sequence[tuple], spec: str | None, *, on_done: Callable | None = None,
                   keep_results: bool = True) -> list:
    """``[fn(*part) for part in parts]``, in process (spec None) or as Dask tasks; ``on_done(i,
    result)`` is called as each partition finishes (any order); results keep ``parts`` order.

    keep_results False: each result is dropped after ``on_done`` (and released on the cluster),
    so this process holds one at a time; the list returned is then all None. A task whose
    worker dies is rerun on another worker by Dask (up to its allowed failures).
    """
    if not spec:
        out = []
        for i, part in enumerate(parts):
            result = fn(*part)
            if on_done:
                on_done(i, result)
            out.append(result if keep_results else None)
        return out
    from dask.distributed import as_completed

    with dask_client(spec) as client:
        futures = [client.submit(fn, *part, pure=False) for part in parts]
        index = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(futures)
        for fut in as_completed(futures):
            i = index[fut.key]
            result = fut.result()
            if on_done:
                on_done(i, result)
            if keep_results:
                results[i] = result
            fut.release()
            futures[i] = None
        return results

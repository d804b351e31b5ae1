"""A Prefect API whose scheduler runs, for ``geopipe serve``.

Prefect's scheduler service (the one that turns a deployment's schedule into flow runs) does
not run on the ephemeral server Prefect starts on demand, so a served deployment on a fresh
machine would never run. ``geopipe serve`` therefore either uses the server named by
``PREFECT_API_URL`` (checked to answer; its scheduler must run, as it does under
``prefect server start``) or starts ``prefect server start`` itself on a free local port,
with all its services, for as long as it serves, and stops it on exit.

Call :func:`scheduling_api` before anything imports prefect: Prefect reads its settings at import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator

from geopipe.pipeline.core.errors import ConfigError, GeopipeError

__all__ = ["scheduling_api", "remove_scheduled_runs", "check_schedule", "STARTUP_TIMEOUT_S", "MAX_INTERVAL_S"]

#: Seconds to wait for a started server to answer (a busy 2-core machine needs ~30).
STARTUP_TIMEOUT_S = 240
#: Longest --interval (one year): a longer schedule is a calendar one, a --cron.
MAX_INTERVAL_S = 366 * 86400.0
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_CRON_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}
_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


def _cron_value(text: str, field: int) -> int:
    names = _CRON_NAMES.get(field)
    if names and text.lower() in names:
        return names.index(text.lower()) + (1 if field == 3 else 0)
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def _cron_problem(cron: str) -> str | None:
    """Why ``cron`` is not a standard 5-field cron expression (minute hour day-of-month month
    day-of-week: ``*``, numbers, names, ranges ``a-b``, lists, steps ``/n``) or alias; None if it is."""
    parts = cron.split()
    if len(parts) == 1 and parts[0].lower() in _CRON_ALIASES:
        return None
    if len(parts) != 5:
        return f"it has {len(parts)} fields, a cron expression has 5 (minute hour day-of-month month day-of-week) or is one of {list(_CRON_ALIASES)}"
    for i, (part, (name, lo, hi)) in enumerate(zip(parts, _CRON_FIELDS)):
        for item in part.split(","):
            body, _, step = item.partition("/")
            try:
                if step and (not step.isdigit() or int(step) < 1):
                    raise ValueError(step)
                ends = (lo, hi) if body == "*" else [_cron_value(x, i) for x in body.split("-", 1)]
            except ValueError:
                return f"{name} field {part!r} is not *, a number, a name, a range a-b, a list or a step /n"
            if not all(lo <= v <= hi for v in ends):
                return f"{name} field {part!r} is outside {lo}-{hi}"
            if ends[0] > ends[-1]:
                return f"{name} field {part!r} is a range that runs backwards"
    return None


def check_schedule(cron: str | None, interval_s: float | None) -> None:
    """ConfigError (one line) unless exactly one of ``cron`` (a 5-field cron expression or an
    alias such as ``@daily``) and ``interval_s`` (seconds, finite, in (0, :data:`MAX_INTERVAL_S`])
    is given: ``geopipe serve`` checks this before it starts anything."""
    if (cron is None) == (interval_s is None):
        raise ConfigError("give exactly one of --cron or --interval")
    if cron is not None:
        problem = _cron_problem(cron)
        if problem:
            raise ConfigError(f"--cron {cron!r} is not a cron schedule: {problem}; e.g. '0 3 * * *' (daily at 03:00)")
    elif isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not (0 < interval_s <= MAX_INTERVAL_S):
        raise ConfigError(f"--interval must be a number of seconds in (0, {MAX_INTERVAL_S:.0f}] (a year; longer: --cron), got {interval_s!r}")


def _healthy(api_url: str, timeout: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's child process: get SIGTERM when geopipe serve dies, even by SIGKILL (Linux)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def remove_scheduled_runs(flow_name: str, deployment_name: str) -> int:
    """When serve stops: pause deployment ``flow_name/deployment_name`` (no new runs are scheduled)
    and delete its runs still SCHEDULED (the scheduler queues ~100 ahead, which would otherwise
    sit in the server's database, and run if it is served again). Returns how many were deleted;
    0 when the deployment is not there."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    async def remove() -> int:
        async with get_client() as client:
            try:
                dep = await client.read_deployment_by_name(f"{flow_name}/{deployment_name}")
            except ObjectNotFound:
                return 0
            await client.pause_deployment(dep.id)
            scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
            n = 0
            while runs := await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                                      flow_run_filter=scheduled, sort=FlowRunSort.ID_DESC, limit=200):
                for run in runs:
                    await client.delete_flow_run(run.id)
                n += len(runs)
            return n

    return asyncio.run(remove())


@contextlib.contextmanager
def scheduling_api(echo: Callable[[str], None]) -> Iterator[str]:
    """Yield the URL of a Prefect API whose scheduler runs (see the module docstring); raise
    GeopipeError, saying that no scheduled run would happen, when there is none."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not _healthy(url):
            raise GeopipeError(f"PREFECT_API_URL={url} does not answer: no scheduled run can happen; start that server "
                               "(prefect server start) or unset PREFECT_API_URL to let geopipe start one")
        echo(f"geopipe serve: using the Prefect server at {url} (its scheduler service must be running)")
        yield url
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = os.environ.get("PREFECT_HOME") or os.path.expanduser("~/.prefect")
    os.makedirs(home, exist_ok=True)
    log = tempfile.NamedTemporaryFile(prefix="geopipe-prefect-server-", suffix=".log", dir=home, delete=False)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(url, timeout=2.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise GeopipeError(f"the Prefect server geopipe started did not come up (log: {log.name}): no scheduled run can "
                                   "happen; start one with `prefect server start` and set PREFECT_API_URL")
            time.sleep(0.5)
        os.environ["PREFECT_API_URL"] = url
        echo(f"geopipe serve: started a Prefect server with its scheduler at {url} (pid {proc.pid}, log {log.name}); "
             "it stops when serve stops")
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _stop(proc)
        log.close()

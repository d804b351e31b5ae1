"""geopipe serve, on stop: its deployment is paused and the runs it still had SCHEDULED are
deleted (before: Ctrl-C left ~80 future runs SCHEDULED in the server's database); the
deployment's entrypoint is a module path, whatever the directory serve started in."""

from __future__ import annotations

import asyncio
import datetime as dt
import inspect

from geopipe.flows.pipeline_flow import deployment_name, scheduled_deployment, scheduled_flow
from geopipe.flows.serve import remove_scheduled_runs
from geopipe.flows.tasks import prefect_defaults


def _toml(tmp_path) -> str:
    path = tmp_path / "nightly.toml"
    path.write_text('[uncertainty.retrieve]\nquery = "q.zarr"\nout = "r.parquet"\n')
    return str(path)


async def _apply(deployment):
    out = deployment.apply()
    return await out if inspect.isawaitable(out) else out


async def _scheduled_and_paused(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        dep = await client.read_deployment_by_name(f"{scheduled_flow.name}/{name}")
        runs = await client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))),
            sort=FlowRunSort.ID_DESC, limit=200)
        return len(runs), dep.paused, dep.entrypoint


async def _schedule_runs(name: str, n: int):
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    async with get_client() as client:
        dep = await client.read_deployment_by_name(f"{scheduled_flow.name}/{name}")
        for i in range(n):  # what the scheduler queues ahead of an interval schedule
            when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=i + 1)
            await client.create_flow_run_from_deployment(dep.id, state=Scheduled(scheduled_time=when))


def test_stop_pauses_and_removes_the_scheduled_runs(tmp_path, monkeypatch):
    config = _toml(tmp_path)
    monkeypatch.chdir(tmp_path)  # serve started elsewhere than the checkout
    name = deployment_name(config)
    assert name == "geopipe-nightly"
    with prefect_defaults():
        dep = scheduled_deployment(config, interval_s=3600)
        assert dep.entrypoint == "geopipe.flows.pipeline_flow.scheduled_flow"
        asyncio.run(_apply(dep))
        asyncio.run(_schedule_runs(name, 5))
        n, paused, entrypoint = asyncio.run(_scheduled_and_paused(name))
        assert n == 5 and not paused and entrypoint == "geopipe.flows.pipeline_flow.scheduled_flow"
        assert remove_scheduled_runs(scheduled_flow.name, name) == 5
        assert asyncio.run(_scheduled_and_paused(name))[:2] == (0, True)
        assert remove_scheduled_runs(scheduled_flow.name, "geopipe-absent") == 0

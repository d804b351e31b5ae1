"""What real Prefect flow runs of the tests did, read back from the Prefect API."""

from __future__ import annotations

import asyncio


def completed_task_kinds(flow_run_id) -> set:
    """Names (first word: "extract", "train", …) of the completed task runs of a flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def names():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
            return {r.name.split()[0] for r in runs if r.flow_run_id == flow_run_id and r.state and r.state.is_completed()}

    return asyncio.run(names())

"""The Prefect flow runs for real on the ephemeral local server (Dask scoring: tests/stages/test_predict_dask.py)."""

import json

import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.config import load_pipeline_config, parse_pipeline_config


def _doc(demo_world, tmp_path):
    t = str(tmp_path)
    return {
        "workdir": t,
        "extract": {
            "train": {"shards": [demo_world["train"]], "store": f"{t}/train.zarr", "num_workers": 0, "progress": False},
            "test": {"shards": [demo_world["test"]], "store": f"{t}/test.zarr", "num_workers": 0, "progress": False},
        },
        "train": {"store": f"{t}/train.zarr", "out": f"{t}/model", "dim": 32, "depth": 2, "steps": 30, "batch_size": 64,
                  "warmup": 5, "val_every": 15, "device": "cpu", "progress": False},
        "predict": {"checkpoint": f"{t}/model", "store": f"{t}/test.zarr", "out": f"{t}/p.parquet", "steps": 4,
                    "device": "cpu", "progress": False},
        "evaluate": {"predictions": [f"{t}/p.parquet"], "out": f"{t}/report.json", "baseline_store": f"{t}/train.zarr"},
    }


def test_prefect_flow_end_to_end(demo_world, tmp_path):
    from prefect.client.orchestration import get_client

    from geopipe.flows.pipeline_flow import geopipe_flow

    cfg = parse_pipeline_config(_doc(demo_world, tmp_path))
    state = geopipe_flow(cfg, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert "constant" in result.table.lower()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reports"][0]["distance"]["n"] == 80
    # the run is recorded by the (ephemeral) Prefect server with its task runs
    import asyncio

    async def _runs_and_artifacts():
        async with get_client() as client:
            from prefect.client.schemas.sorting import TaskRunSort

            runs = await client.read_task_runs(limit=200, sort=TaskRunSort.EXPECTED_START_TIME_ASC)
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, TaskRunFilter
            from prefect.client.schemas.sorting import ArtifactSort

            flow_run = state.state_details.flow_run_id
            artifacts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run])),
                flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=200)
            return {r.name for r in runs if r.flow_run_id == flow_run}, {a.key: a for a in artifacts if a.flow_run_id == flow_run}

    names, artifacts = asyncio.run(_runs_and_artifacts())
    # task runs are named after their input
    assert {"extract train.zarr", "extract test.zarr", "train model", "predict p.parquet", "evaluate p.parquet"} <= names, names
    assert "constant" in artifacts["geopipe-evaluation"].data and artifacts["geopipe-evaluation"].type == "markdown"
    assert artifacts["store-test-zarr"].type == "table" and '"records": 80' in str(artifacts["store-test-zarr"].data)
    assert '"records": 400' in str(artifacts["store-train-zarr"].data)


def test_config_is_strict(tmp_path, demo_world):
    doc = _doc(demo_world, tmp_path)
    doc["train"]["stepz"] = 3
    with pytest.raises(GeopipeError, match="stepz.*valid keys"):
        parse_pipeline_config(doc)
    doc = _doc(demo_world, tmp_path)
    doc["predict"]["steps"] = "many"
    with pytest.raises(GeopipeError, match=r"\[predict\] steps: input should be a valid integer, got 'many'"):
        parse_pipeline_config(doc)
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(GeopipeError, match="not valid TOML"):
        load_pipeline_config(str(bad))


def test_scheduled_deployment(tmp_path, demo_world):
    import tomllib  # noqa: F401  (the deployment re-reads TOML at each run)

    from geopipe.flows.pipeline_flow import scheduled_deployment

    cfg = tmp_path / "pipeline.toml"
    cfg.write_text('[train]\nstore = "s"\nout = "o"\n[predict]\ncheckpoint = "o"\nstore = "s"\nout = "p"\n[evaluate]\npredictions = ["p"]\n')
    dep = scheduled_deployment(str(cfg), cron="0 3 * * *")
    assert dep.name == "geopipe-pipeline" and dep.parameters == {"config_path": str(cfg)}
    assert dep.schedules[0].schedule.cron == "0 3 * * *"
    with pytest.raises(ValueError, match="exactly one"):
        scheduled_deployment(str(cfg))

"""Reruns of the Prefect flow do only new work: nothing new → no train/predict task runs; a new
shard → only that shard is extracted, then the model is retrained and re-scored."""

import os
import shutil

import pytest
from flow_runs import completed_task_kinds

from geopipe.stages.config import parse_pipeline_config
from geopipe.stages.rerun import STATE_FILE, RerunConfig


def _doc(shards_dir, demo_world, t, **rerun):
    return {
        "workdir": t,
        "extract": {
            "train": {"shards": [f"{shards_dir}/train-*.tar"], "store": f"{t}/train.zarr", "num_workers": 0, "progress": False},
            "test": {"shards": [demo_world["test"]], "store": f"{t}/test.zarr", "num_workers": 0, "progress": False},
        },
        "train": {"store": f"{t}/train.zarr", "out": f"{t}/model", "dim": 16, "depth": 1, "steps": 6, "batch_size": 32,
                  "warmup": 1, "val_every": 6, "device": "cpu", "progress": False},
        "predict": {"checkpoint": f"{t}/model", "store": f"{t}/test.zarr", "out": f"{t}/p.parquet", "steps": 2,
                    "device": "cpu", "progress": False},
        "evaluate": {"predictions": [f"{t}/p.parquet"], "out": f"{t}/report.json"},
        **({"rerun": rerun} if rerun else {}),
    }


def _run(doc):
    from geopipe.flows.pipeline_flow import geopipe_flow

    state = geopipe_flow(parse_pipeline_config(doc), return_state=True)
    assert state.is_completed(), state
    return state.result(), completed_task_kinds(state.state_details.flow_run_id)


def test_rerun_skips_unchanged_work_and_extracts_only_new_shards(demo_world, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(os.path.join(demo_world["dir"], "train-000000.tar"), shards)
    t = str(tmp_path / "work")

    first, kinds = _run(_doc(shards, demo_world, t))
    assert {"extract", "train", "predict", "evaluate"} <= kinds and os.path.exists(os.path.join(t, STATE_FILE))

    second, kinds = _run(_doc(shards, demo_world, t))
    assert kinds == {"extract"}  # no train, predict or evaluate task ran
    assert second.table == first.table and any("train skipped" in r for r in second.skipped)
    assert [r.shards_done for r in second.results["extract"]] == [0, 0]

    shutil.copy(os.path.join(demo_world["dir"], "train-000001.tar"), shards)  # new data arrives
    third, kinds = _run(_doc(shards, demo_world, t))
    train_ex, test_ex = third.results["extract"]
    assert (train_ex.shards_done, train_ex.shards_skipped, train_ex.n_ok) == (1, 1, 200)  # only the new shard
    assert test_ex.shards_done == 0
    assert {"train", "predict", "evaluate"} <= kinds
    assert third.results["train"].n_train + third.results["train"].n_val == 400

    # continue mode: predict options change → no retraining, re-scored; new data → continue 3 steps
    doc = _doc(shards, demo_world, t, on_new_data="continue", continue_steps=3)
    doc["predict"]["steps"] = 3
    fourth, kinds = _run(doc)
    assert "train" not in kinds and {"predict", "evaluate"} <= kinds


def test_rerun_continue_trains_the_last_checkpoint_on_for_continue_steps(demo_world, tmp_path):
    """on_new_data = "continue": a new train shard is the only shard extracted, and training
    resumes the last checkpoint for continue_steps more steps (not from scratch)."""
    from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config

    shards = tmp_path / "shards"
    shards.mkdir()
    shutil.copy(os.path.join(demo_world["dir"], "train-000000.tar"), shards)
    t = str(tmp_path / "work")
    _run(_doc(shards, demo_world, t, on_new_data="continue", continue_steps=3))
    before = load_checkpoint_config(os.path.join(t, "model"))
    assert before["step"] == 6

    shutil.copy(os.path.join(demo_world["dir"], "train-000001.tar"), shards)  # new data arrives
    second, kinds = _run(_doc(shards, demo_world, t, on_new_data="continue", continue_steps=3))
    train_ex, test_ex = second.results["extract"]
    assert (train_ex.shards_done, train_ex.shards_skipped, test_ex.shards_done) == (1, 1, 0)  # only the new shard
    assert {"train", "predict", "evaluate"} <= kinds
    after = load_checkpoint_config(os.path.join(t, "model"))
    assert after["step"] == before["step"] + 3
    assert after["data_fingerprint"] != before["data_fingerprint"]  # trained on the grown store
    assert any("train continues" in r and "step 9" in r for r in second.skipped)
    assert second.results["train"].n_train + second.results["train"].n_val == 400


def test_rerun_options_are_checked():
    with pytest.raises(ValueError, match="on_new_data"):
        RerunConfig(on_new_data="sometimes")

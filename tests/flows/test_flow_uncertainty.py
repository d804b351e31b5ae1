"""The uncertainty branch of the Prefect flow (real flow runs on the ephemeral server): a
multi-view demo world → stores → retrieve → pairs + BayesCap → score → evaluate --uncertainty;
a rerun skips every step; too few pairs is not a failure; the [uncertainty] tables are strict."""

import copy
import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from flow_runs import completed_task_kinds

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.config import parse_pipeline_config
from geopipe.stages.rerun import STATE_FILE


def _doc(t, min_pairs=20):
    return {
        "workdir": t,
        "demo_data": {"out": f"{t}/shards", "n_train": 160, "n_test": 40, "shard_size": 160, "views_per_place": 4},
        "extract": {
            "train": {"shards": [f"{t}/shards/train-000000.tar"], "store": f"{t}/train.zarr", "num_workers": 0, "progress": False},
            "test": {"shards": [f"{t}/shards/test-000000.tar"], "store": f"{t}/test.zarr", "num_workers": 0, "progress": False},
        },
        "uncertainty": {
            "retrieve": {"query": f"{t}/test.zarr", "database": f"{t}/train.zarr", "out": f"{t}/retrieval.parquet", "k": 5,
                         "mode": "kernel", "kernel_val": 100, "kernel_samples": 16, "mc_passes": 4, "progress": False},
            "bayescap": {"store": f"{t}/train.zarr", "out": f"{t}/bayescap", "steps": 30, "val_every": 10, "lr": 3e-3,
                         "pairs": {"min_pairs": min_pairs}, "progress": False},
            "evaluate": {"out": f"{t}/uncertainty.json", "failure_km": 2000.0},
        },
    }


def _run(doc):
    from geopipe.flows.pipeline_flow import geopipe_flow

    t0 = time.perf_counter()
    state = geopipe_flow(parse_pipeline_config(doc), return_state=True)
    assert state.is_completed(), state
    return state.result(), completed_task_kinds(state.state_details.flow_run_id), time.perf_counter() - t0


def test_uncertainty_flow_runs_skips_and_survives_too_few_pairs(tmp_path):
    t = str(tmp_path)
    first, kinds, seconds = _run(_doc(t))
    print(f"uncertainty flow, first run: {seconds:.1f} s")
    assert {"demo-data", "extract", "retrieve", "bayescap", "score", "evaluate-uncertainty"} <= kinds
    unc = first.uncertainty
    assert first.table is None and unc.bayescap["status"] == "trained" and unc.bayescap["pairs"]["n_pairs"] >= 20
    table = pq.read_table(f"{t}/retrieval.parquet")
    log_u = np.array(table.column("log_u").to_pylist(), dtype=float)
    assert table.num_rows == 40 and np.isfinite(log_u).all()
    meta = json.loads(table.schema.metadata[b"geopipe"])
    assert meta["model"]["bayescap"] == {"checkpoint": f"{t}/bayescap", "mc_passes": 4}
    scores = {r["score"] for r in json.load(open(f"{t}/uncertainty.json"))["uncertainty"]}
    assert {"log_u", "log_u_alea", "u_dist1", "u_spread_km", "entropy_nats"} <= scores
    assert "log_u_alea" in unc.uncertainty_table and "Recall@K" in unc.table

    # the same numbers as `geopipe retrieve --bayescap` (same rows, same seed)
    from geopipe.stages.retrieve import RetrieveConfig, run_retrieve

    direct = str(tmp_path / "direct.parquet")
    run_retrieve(RetrieveConfig(query=f"{t}/test.zarr", database=f"{t}/train.zarr", out=direct, k=5, mode="kernel", kernel_val=100,
                                kernel_samples=16, uncertainty_checkpoint=f"{t}/bayescap", mc_passes=4, progress=False))
    assert pq.read_table(direct).column("log_u").to_pylist() == log_u.tolist()

    second, kinds, seconds = _run(_doc(t))
    print(f"uncertainty flow, unchanged rerun: {seconds:.1f} s")
    assert kinds == {"demo-data", "extract"}  # retrieve, bayescap, score and evaluate skipped
    assert second.uncertainty.uncertainty_table == unc.uncertainty_table
    assert any(r.startswith("bayescap skipped") for r in second.uncertainty.skipped)

    third, kinds, _ = _run(_doc(t, min_pairs=10**6))  # too few pairs: skip policy, not a failure
    assert {"bayescap", "score", "evaluate-uncertainty"} <= kinds and "retrieve" not in kinds
    assert third.uncertainty.bayescap["status"] == "insufficient_pairs"
    assert pq.read_table(f"{t}/retrieval.parquet").column("log_u").null_count == 40  # the old checkpoint's scores are gone
    *rows, note = third.uncertainty.uncertainty_table.splitlines()
    assert "log_u" not in "\n".join(rows) and "u_dist1" in "\n".join(rows)  # no row for the emptied columns, and
    assert note.startswith("not scored") and "log_u (0 values)" in note  # a line naming them
    state = json.load(open(f"{t}/{STATE_FILE}"))
    assert state["uncertainty"]["bayescap"]["status"] == "insufficient_pairs" and "keys" not in state  # no generative branch ran

    # both branches in one config: the generative one runs, the unchanged uncertainty branch is skipped, both states kept
    doc = _doc(t, min_pairs=10**6)
    doc["train"] = {"store": f"{t}/train.zarr", "out": f"{t}/model", "dim": 16, "depth": 1, "steps": 4, "batch_size": 32,
                    "warmup": 1, "val_every": 4, "device": "cpu", "progress": False}
    doc["predict"] = {"checkpoint": f"{t}/model", "store": f"{t}/test.zarr", "out": f"{t}/p.parquet", "steps": 2, "device": "cpu",
                      "progress": False}
    doc["evaluate"] = {"predictions": [f"{t}/p.parquet"]}
    fourth, kinds, _ = _run(doc)
    assert {"train", "predict", "evaluate"} <= kinds and not kinds & {"retrieve", "bayescap", "score", "evaluate-uncertainty"}
    assert "GeoScore" in fourth.table and fourth.uncertainty.table == third.uncertainty.table
    state = json.load(open(f"{t}/{STATE_FILE}"))
    assert set(state["keys"]) == {"train", "predict", "evaluate"} and state["uncertainty"]["bayescap"]["status"] == "insufficient_pairs"

    # `geopipe run` on the same config as a TOML file: nothing to redo, both tables and why BayesCap did not train
    from click.testing import CliRunner

    from geopipe.flows.cli import cli

    (tmp_path / "run.toml").write_text(_toml(doc))
    r = CliRunner().invoke(cli, ["-q", "run", str(tmp_path / "run.toml")])
    assert r.exit_code == 0, r.output
    assert "GeoScore" in r.output and "AUSC" in r.output and "bayescap: insufficient_pairs" in r.output


def _toml(doc: dict, prefix: str = "") -> str:
    """A TOML document of ``doc`` (tables of strings, numbers, booleans and arrays)."""
    plain = "".join(f"{k} = {json.dumps(v)}\n" for k, v in doc.items() if not isinstance(v, dict))
    tables = "".join(_toml(v, f"{prefix}{k}.") for k, v in doc.items() if isinstance(v, dict))
    return (f"[{prefix[:-1]}]\n" if prefix and plain else "") + plain + tables


BASE = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet"}}}


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["uncertainty"]["retrieve"].update(kk=1), r"^unknown key\(s\) \['kk'\] in \[uncertainty\.retrieve\]; valid keys: \["),
    (lambda d: d["uncertainty"].update(bayescap={"store": "s", "out": "b", "pairs": {"min_pair": 3}}),
     r"^unknown key\(s\) \['min_pair'\] in \[uncertainty\.bayescap\.pairs\]"),
    (lambda d: d["uncertainty"].update(bayescap={"store": "s", "out": "b", "pairs": 3}), r"^\[uncertainty\.bayescap\.pairs\] must be a table"),
    (lambda d: d["uncertainty"]["retrieve"].update(k="5"), r"^\[uncertainty\.retrieve\] k: input should be a valid integer"),
    (lambda d: d["uncertainty"].update(evaluate={"uncertainty": False}), r"always on"),
    (lambda d: d["uncertainty"].update(plots="p"), r"^unknown table\(s\) \['plots'\] in \[uncertainty\]"),
    (lambda d: d["uncertainty"].pop("retrieve"), r"lacks its \[uncertainty\.retrieve\] table"),
    (lambda d: (d["uncertainty"]["retrieve"].update(uncertainty_checkpoint="c"), d["uncertainty"].update(bayescap={"store": "s", "out": "b"})),
     r"both give the BayesCap checkpoint"),
    (lambda d: d.update(train={"store": "t", "out": "m"}), r"^config lacks the \[predict\] section"),
    (lambda d: d.pop("uncertainty"), r"^config lacks the \[train\] section"),
])
def test_uncertainty_tables_are_strict(edit, message):
    doc = copy.deepcopy(BASE)
    edit(doc)
    with pytest.raises(GeopipeError, match=message):
        parse_pipeline_config(doc)


def test_uncertainty_only_config():
    doc = copy.deepcopy(BASE)
    doc["uncertainty"]["bayescap"] = {"store": "d.zarr", "out": "b", "pairs": {"min_pairs": 7}, "no_pairs_policy": "identity"}
    doc["uncertainty"]["evaluate"] = {"predictions": ["g.parquet"], "failure_km": 200}
    cfg = parse_pipeline_config(doc)
    assert cfg.train is None and cfg.predict is None and cfg.evaluate is None
    u = cfg.uncertainty
    assert u.bayescap.pairs.min_pairs == 7 and u.bayescap.no_pairs_policy == "identity"
    assert u.evaluate.predictions == ("r.parquet", "g.parquet") and u.evaluate.uncertainty and u.evaluate.failure_km == 200.0

"""evaluate on retrieval files: Recall@K section, the failure-prediction table and plots."""

import json
import os

import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.pipeline.retrieval.split import SplitConfig
from geopipe.schemas.report import validate_report
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve


@pytest.fixture(scope="module")
def retrieval_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("evu")
    store = str(d / "views.zarr")
    write_synthetic_store(store, SyntheticConfig(n_places=150, views_per_place=4, dim=16, seed=2))
    out = str(d / "retrieval.parquet")
    run_retrieve(RetrieveConfig(query=store, out=out, k=5, mode="kernel", split=SplitConfig(mode="leave_one_out"),
                                kernel_val=200, kernel_samples=16))
    return out


def test_recall_and_failure_rows(retrieval_file, tmp_path):
    res = run_evaluate(EvaluateConfig(predictions=(retrieval_file,), out=str(tmp_path / "r.json"), uncertainty=True,
                                      failure_km=0.5, plots_dir=str(tmp_path / "plots")))  # median error 0.4 km: both classes
    rec = res.reports[0]["retrieval"]
    assert rec["n_unanswerable"] == 0 and 0 < rec["recall"]["1"] <= rec["recall"]["5"] <= 1
    assert rec["recall_km"]["25"]["1"] >= rec["recall"]["1"]
    assert "Recall@K (%) at 25 m" in res.table
    rows = {(r["score"], r["failure"]): r for r in res.uncertainty}
    d1 = rows[("u_dist1", "correct@1 25 m")]
    assert d1["aurg"] > 0 and d1["auroc"] > 0.6 and d1["ause"] >= 0
    assert ("entropy_nats", "correct@1 25 m") in rows and ("u_ratio12", "error <= 0.5 km") in rows
    assert "AUSC" in res.uncertainty_table and "u_spread_km" in res.uncertainty_table
    doc = json.load(open(tmp_path / "r.json"))
    assert validate_report(doc) == [] and len(doc["uncertainty"]) == len(res.uncertainty)
    # retrieved without BayesCap: the empty log_u columns are named, not silently left out
    assert {r["score"] for r in doc["uncertainty_not_scored"]} == {"log_u", "log_u_alea", "log_u_epi"}
    assert not any(s.startswith("log_u") for s, _ in rows)
    assert res.uncertainty_table.splitlines()[-1].startswith("not scored (fewer than 2 finite values on records with a known truth): "
                                                             "retrieval · log_u (0 values)")
    assert len(res.plots) == 4 and all(os.path.getsize(p) > 1000 for p in res.plots)


def test_cli_evaluate_uncertainty(retrieval_file):
    r = CliRunner().invoke(cli, ["evaluate", retrieval_file, "--uncertainty"])
    assert r.exit_code == 0, r.output
    assert "AURG" in r.output and "u_geo_inconsistency" in r.output
    # one line per failure definition with both classes says which score wins and by how much over the runner-up
    r = CliRunner().invoke(cli, ["evaluate", retrieval_file, "--uncertainty", "--failure-km", "0.5"])
    best = [line for line in r.output.splitlines() if line.startswith("best failure score of retrieval for ")]
    assert [line.split("'")[1] for line in best] == ["correct@1 25 m", "error <= 0.5 km"]
    assert all(" ahead of " in line and " AUROC / " in line and "entropy_nats" in line for line in best)

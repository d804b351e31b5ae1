"""The ``make demo`` pipeline (``geopipe demo``), scaled down: one real flow run on the multi-view
demo world runs both branches — the generative one and retrieval + BayesCap + evaluate
--uncertainty with the generative predictions beside the retrieval — and the CLI prints the
three tables."""

import json
import os

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.e2e


def test_the_demo_runs_both_branches_and_prints_three_tables(tmp_path, monkeypatch):
    import geopipe.flows.cli as cli_module
    from geopipe.stages.config import demo_pipeline_config

    small = lambda workdir, train_steps: demo_pipeline_config(  # noqa: E731
        workdir, train_steps=train_steps, n_train=400, n_test=80, bayescap_steps=40, min_pairs=50)
    monkeypatch.setattr("geopipe.stages.config.demo_pipeline_config", small)
    work = str(tmp_path / "demo")
    res = CliRunner().invoke(cli_module.cli, ["--quiet", "demo", "--workdir", work, "--steps", "40"])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "Retrieval beside the generative model" in out and "Failure prediction (error > 750 km)" in out
    tables = out.split("\n\n")
    assert "constant baseline" in tables[0] and "rfm" in tables[0]
    assert "retrieval" in tables[1] and "rfm" in tables[1]
    assert "log_u" in tables[2] and "rfm" in tables[2]  # BayesCap's score and the generative ones side by side
    cols = pq.read_schema(os.path.join(work, "retrieval.parquet")).names
    assert {"log_u", "log_u_alea", "log_u_epi"} <= set(cols)
    with open(os.path.join(work, "bayescap", "config.json")) as fh:
        assert json.load(fh)["method"] == "bayescap-cycle"
    assert any(name.endswith(".png") for name in os.listdir(os.path.join(work, "plots")))

"""geopipe bench prints a human table (figure, same-run baseline, ratio, target, verdict) instead of
raw JSON; --json and -o keep the figures as JSON."""

from __future__ import annotations

import json

from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.stages.bench_table import bench_rows, format_bench_table


def test_rows_carry_targets_and_verdicts():
    results = {"predict": {"records_per_s": 59.8, "bare_forward_s": 71.6, "ratio_bare_over_sample": 1.05},
               "nll": {"records_per_s": 1.31, "function_evals": 350, "forward_s": 0.293, "cost_per_eval_over_forward": 6.2},
               "retrieval": {"blocked_queries_per_s": 70.0, "bare_queries_per_s": 62.8, "blocked_over_bare": 1.11}}
    (pred,) = bench_rows("predict", results["predict"])
    assert pred[3:] == ["1.05", "≥ 0.9", "met"] and "59.8" in pred[1] and "71.6 s" in pred[2]
    (nll,) = bench_rows("nll", results["nll"])
    assert nll[3:] == ["6.2", "≤ 5", "MISSED"] and "350 evals" in nll[1]
    (ret,) = bench_rows("retrieval", results["retrieval"])
    assert ret[4:] == ["-", "-"]  # no target stated: no verdict
    table = format_bench_table(results)
    assert table.splitlines()[0].split()[:2] == ["benchmark", "figure"]
    assert table.splitlines()[-1] == "verdict: 1 of 2 targets met; missed: exact NLL, records/s"


def test_cli_prints_the_table_and_json_on_request(tmp_path):
    args = ["bench", "--what", "predict", "--dim", "16", "--depth", "1", "--batch", "8", "--steps", "2", "--repeats", "1",
            "--device", "cpu"]
    r = CliRunner().invoke(cli, ["--quiet", *args, "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert "guided sampling, records/s" in r.output and "≥ 0.9" in r.output and "verdict: " in r.output
    assert json.load(open(tmp_path / "b.json"))["predict"]["records_per_s"] > 0
    r = CliRunner().invoke(cli, ["--quiet", *args, "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["predict"]["ratio_bare_over_sample"] > 0

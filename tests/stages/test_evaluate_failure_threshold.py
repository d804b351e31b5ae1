"""evaluate --uncertainty: the default failure threshold (750 km, stated once) splits a coarse
model's records; a threshold that leaves one class empty warns, scores AUROC/AUPRC as undefined
and draws no plot (before: 25 km, every record failed, AUPRC 1.000 and flat plots, silently)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.eval.failure import FailureOptions
from geopipe.pipeline.sphere.geometry import haversine_km
from geopipe.schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate

N = 120


def _coarse_predictions(path) -> str:
    """Errors from ~100 to ~2,500 km (a CPU-sized model), the entropy growing with the error."""
    rng = np.random.default_rng(3)
    tl, tn = rng.uniform(-40, 40, N), rng.uniform(-120, 120, N)
    off = np.linspace(1.0, 22.0, N)  # degrees of latitude: 111 to 2,440 km
    lat, lon = np.clip(tl + off, -89, 89), tn
    cols = {"key": [f"{i:06d}" for i in range(N)], "lat": lat, "lon": lon, "true_lat": tl, "true_lon": tn,
            "distance_km": haversine_km(lat, lon, tl, tn), "neg_entropy_nats": -(off + rng.normal(0, 3, N))}
    table = pa.Table.from_arrays([pa.array(cols.get(f.name, [None] * N), type=f.type) for f in PREDICTIONS_SCHEMA],
                                 schema=PREDICTIONS_SCHEMA)
    meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": {}, "model": {"method": "rfm", "space": "sphere"}}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), str(path))
    return str(path)


def test_default_threshold_is_750_km_and_splits_the_records(tmp_path, capsys):
    assert EvaluateConfig(predictions=("p",)).failure_km == FailureOptions().failure_km == 750.0
    path = _coarse_predictions(tmp_path / "p.parquet")
    res = run_evaluate(EvaluateConfig(predictions=(path,), names=("m",), uncertainty=True, plots_dir=str(tmp_path / "plots")))
    (row,) = res.uncertainty
    assert row["failure"] == "error <= 750 km" and 0.2 < row["accuracy"] < 0.5
    assert row["auroc"] > 0.8 and row["auprc"] is not None and len(res.plots) == 2
    assert "warning" not in capsys.readouterr().err


def test_one_class_threshold_warns_and_draws_no_flat_plot(tmp_path):
    path = _coarse_predictions(tmp_path / "p.parquet")
    r = CliRunner().invoke(cli, ["evaluate", path, "--name", "m", "--uncertainty", "--failure-km", "25",
                                 "--plots", str(tmp_path / "plots")])
    assert r.exit_code == 0, r.output
    warn = [line for line in r.stderr.splitlines() if "warning" in line]
    assert len(warn) == 1, r.stderr
    assert "every one of its 120 records fails 'error <= 25 km'" in warn[0] and "--failure-km near its median error" in warn[0]
    assert "plot →" not in r.output and not (tmp_path / "plots").exists() or not any((tmp_path / "plots").iterdir())
    row = [line for line in r.output.splitlines() if line.startswith("m ") and "entropy_nats" in line][0]
    assert row.split()[-2:] == ["-", "-"]  # AUROC and AUPRC undefined, not 1.000
    # every record passing is one class too
    res = run_evaluate(EvaluateConfig(predictions=(path,), names=("m",), uncertainty=True, failure_km=20000.0))
    assert res.uncertainty[0]["accuracy"] == 1.0 and res.uncertainty[0]["auprc"] is None


def test_help_states_the_default(tmp_path):
    r = CliRunner().invoke(cli, ["evaluate", "--help"])
    assert "750" in " ".join(r.output.split())

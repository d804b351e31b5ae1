"""Evaluate stage: predictions Parquet files → report JSON (geopipe.schemas.report) and text table."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.metrics import distance_metrics
from geopipe.pipeline.sphere.geometry import haversine_km
from geopipe.schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID
from geopipe.schemas.report import COMPARISON_COLUMNS, REPORT_SCHEMA_ID, validate_report
from geopipe.stages.evaluate import EvaluateConfig, format_table, run_evaluate, store_mean_direction

N = 80


def _truth(seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.uniform(30, 60, N), rng.uniform(-10, 30, N)


def _write_predictions(path, pred_lat, pred_lon, *, method="rfm", space="sphere", nll=True, truth=True):
    tl, tn = _truth()
    rng = np.random.default_rng(1)
    cols = {
        "key": [f"{i:06d}" for i in range(N)], "lat": pred_lat, "lon": pred_lon,
        "true_lat": tl if truth else [None] * N, "true_lon": tn if truth else [None] * N,
        "distance_km": haversine_km(pred_lat, pred_lon, tl, tn) if truth else [None] * N,
        "log_likelihood": rng.normal(1.0, 0.5, N) if nll else [None] * N,
        "neg_entropy_nats": rng.normal(0.5, 0.2, N), "entropy_bits": [None] * N, "effective_area_km2": [None] * N,
        "hdr_rank": rng.integers(0, 65, N) / 64, "sample_lat": [None] * N, "sample_lon": [None] * N, "geometry": [None] * N,
    }
    table = pa.Table.from_arrays([pa.array(cols.get(f.name, [None] * N), type=f.type) for f in PREDICTIONS_SCHEMA],
                                 schema=PREDICTIONS_SCHEMA)
    meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": {"steps": 16}, "model": {"method": method, "space": space}}
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), path)
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    tl, tn = _truth()
    good = _write_predictions(tmp_path / "rfm.parquet", tl + 0.5, tn - 0.5)
    rng = np.random.default_rng(5)
    bad = _write_predictions(tmp_path / "flow.parquet", rng.uniform(-60, 60, N), rng.uniform(-180, 180, N),
                             method="flow", space="r3")
    return good, bad


def test_one_file_report_and_two_column_table(two_files, tmp_path):
    out = tmp_path / "rep" / "report.json"
    res = run_evaluate(EvaluateConfig(predictions=(two_files[0],), out=str(out)))
    doc = json.loads(out.read_text())
    assert validate_report(doc) == [] and doc["schema"] == REPORT_SCHEMA_ID
    (entry,) = res.reports
    tl, tn = _truth()
    assert entry["distance"] == pytest.approx(distance_metrics(tl + 0.5, tn - 0.5, tl, tn))
    assert entry["method"] == "rfm" and entry["nll"]["space"] == "sphere"
    assert entry["nll"]["nll_bits_per_dim"] == pytest.approx(-entry["nll"]["mean_log_likelihood_nats"] / (3 * math.log(2)))
    assert len(entry["calibration"]["coverage"]) == 9 and entry["prdc"]["k"] == 3
    assert entry["admin"] is None
    lines = res.table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert any(line.startswith("GeoScore") and f"{entry['distance']['geoscore']:.1f}" in line for line in lines)
    assert any(line.startswith("calibration error") for line in lines)


def test_two_files_and_baseline_one_row_per_model(two_files, tmp_path):
    out = tmp_path / "report.json"
    cfg = EvaluateConfig(predictions=two_files, names=("RFM S2", "FM R3"), out=str(out), baseline_latlon=(45.0, 10.0))
    res = run_evaluate(cfg)
    doc = json.loads(out.read_text())
    assert validate_report(doc) == []
    assert [r["name"] for r in doc["comparison"]] == ["RFM S2", "FM R3", "constant baseline"]
    assert set(doc["comparison"][0]) == set(COMPARISON_COLUMNS)
    assert doc["reports"][2]["kind"] == "baseline" and doc["reports"][2]["nll"] is None
    assert any("not comparable" in note for note in doc["notes"])  # S² and R³ NLLs side by side
    rows = res.table.splitlines()
    assert rows[0].split()[:3] == ["model", "method", "N"]
    for name, method in (("RFM S2", "rfm"), ("FM R3", "flow"), ("constant baseline", "constant")):
        assert sum(line.startswith(name) and f" {method} " in line for line in rows) == 1
    assert "S²" in next(r for r in rows if r.startswith("RFM S2")) and "R³" in next(r for r in rows if r.startswith("FM R3"))
    scores = {r["name"]: r["geoscore"] for r in doc["comparison"]}
    assert scores["RFM S2"] > scores["constant baseline"] > 0
    assert format_table(res.reports) == res.table


def test_file_without_truth_or_nll_skips_those_sections(tmp_path):
    tl, tn = _truth()
    path = _write_predictions(tmp_path / "p.parquet", tl, tn, nll=False, truth=False)
    (entry,) = run_evaluate(EvaluateConfig(predictions=[path])).reports
    assert entry["distance"] is None and entry["nll"] is None and entry["prdc"] is None
    assert entry["localizability"]["n"] == N
    with pytest.raises(GeopipeError, match="true coordinates"):
        run_evaluate(EvaluateConfig(predictions=(path,), baseline_latlon=(0.0, 0.0)))


def test_non_geopipe_and_missing_files_are_user_errors(tmp_path):
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"key": ["a"], "lat": [1.0], "lon": [2.0]}), plain)
    with pytest.raises(GeopipeError, match="not a geopipe predictions file"):
        run_evaluate(EvaluateConfig(predictions=(str(plain),)))
    with pytest.raises(GeopipeError, match="does not exist"):
        run_evaluate(EvaluateConfig(predictions=(str(tmp_path / "nope.parquet"),)))
    text = tmp_path / "notes.parquet"
    text.write_text("not parquet")
    with pytest.raises(GeopipeError, match="not a readable Parquet file"):
        run_evaluate(EvaluateConfig(predictions=(str(text),)))


def test_config_validation():
    with pytest.raises(ValueError, match="one name per file"):
        EvaluateConfig(predictions=("a", "b"), names=("x",))
    with pytest.raises(ValueError, match="prdc_k"):
        EvaluateConfig(predictions=("a",), prdc_k=0)


def test_report_validator_flags_problems():
    problems = validate_report({"schema": "geopipe.report/9", "reports": [{"name": "x"}], "comparison": []})
    assert any("missing key 'version'" in p for p in problems)
    assert any("unsupported report schema" in p for p in problems)
    assert any("reports[0] lacks 'kind'" in p for p in problems)
    assert any("comparison has 0 rows" in p for p in problems)


def _store(tmp_path, keys, countries):
    import zarr

    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w")
    k = g.create_array("keys", shape=(len(keys),), dtype=str)
    k[:] = np.array(keys)
    g.create_array("latlon", data=np.column_stack(_truth())[: len(keys)])
    meta = g.require_group("meta")
    for field, values in (("unique_country", countries), ("unique_region", ['"R"'] * len(keys)), ("unique_city", [""] * len(keys))):
        arr = meta.create_array(field, shape=(len(keys),), dtype=str)
        arr[:] = np.array(values)
    g.attrs.update({"rows": len(keys), "meta_fields": ["unique_country", "unique_region", "unique_city"]})
    return str(tmp_path / "s.zarr")


def test_admin_accuracy_from_store_labels(two_files, tmp_path, monkeypatch):
    keys = [f"{i:06d}" for i in range(N)]
    countries = ['"FR"' if i % 4 else '"NaN"' for i in range(N)]  # JSON-encoded; every 4th missing
    store = _store(tmp_path, keys, countries)
    fake = types.ModuleType("reverse_geocoder")
    fake.search = lambda coords, mode=2, verbose=True: [
        {"cc": "FR" if lat > 45 else "DE", "admin1": "R", "admin2": "", "name": "c"} for lat, _ in coords]
    monkeypatch.setitem(sys.modules, "reverse_geocoder", fake)
    (entry,) = run_evaluate(EvaluateConfig(predictions=(two_files[0],), store=store)).reports
    tl, tn = _truth()
    known = np.arange(N) % 4 != 0
    assert entry["admin"]["country"] == {"n": int(known.sum()), "accuracy": pytest.approx(np.mean((tl + 0.5)[known] > 45))}
    assert entry["admin"]["region"]["accuracy"] == 0.0  # "R" vs predicted "R_FR"/"R_DE"
    assert entry["admin"]["city"] == {"n": 0, "accuracy": None}
    # from the CLI, several files: the comparison table grows country/region/city columns
    from click.testing import CliRunner

    from geopipe.flows.cli import cli

    res = CliRunner().invoke(cli, ["evaluate", *two_files, "--store", store, "--prdc-k", "2"])
    assert res.exit_code == 0, res.output
    header, _, rfm_row, *_ = res.output.splitlines()
    assert header.split()[-6:] == ["country", "%", "region", "%", "city", "%"]
    assert rfm_row.split()[-3:] == [f"{100 * np.mean((tl + 0.5)[known] > 45):.1f}", "0.0", "-"]
    monkeypatch.setitem(sys.modules, "reverse_geocoder", None)
    with pytest.raises(GeopipeError, match=r"reverse geocoding of the predicted points.*pip install 'geopipe-geolocation\[geocode\]'"):
        run_evaluate(EvaluateConfig(predictions=(two_files[0],), geocode=True))
    with pytest.raises(GeopipeError, match="no meta field 'cc'"):
        run_evaluate(EvaluateConfig(predictions=(two_files[0],), store=store, country_field="cc"))


def test_store_mean_direction(tmp_path):
    store = _store(tmp_path, [f"{i}" for i in range(N)], ['"FR"'] * N)
    lat, lon = store_mean_direction(store)
    tl, tn = _truth()
    assert 30 < lat < 60 and -10 < lon < 30
    assert haversine_km(lat, lon, tl, tn).sum() < haversine_km(lat + 5, lon, tl, tn).sum()
    with pytest.raises(GeopipeError, match="cannot read"):
        store_mean_direction(str(tmp_path / "missing.zarr"))


def test_nan_prediction_is_a_user_error_naming_the_file(tmp_path):
    tl, tn = _truth()
    lat = tl.copy()
    lat[3] = np.nan
    path = _write_predictions(tmp_path / "nan.parquet", lat, tn)
    with pytest.raises(GeopipeError, match=r"nan\.parquet.*row 3"):
        run_evaluate(EvaluateConfig(predictions=(path,)))


def test_prdc_chunks_option_reaches_the_report(two_files):
    (entry,) = run_evaluate(EvaluateConfig(predictions=(two_files[0],), prdc_k=2, prdc_chunks=4)).reports
    assert (entry["prdc"]["k"], entry["prdc"]["chunks"]) == (2, 4)
    (tiny,) = run_evaluate(EvaluateConfig(predictions=(two_files[0],), prdc_chunks=40)).reports  # chunks of 2 ≤ k
    assert tiny["prdc"] is None and tiny["distance"]["n"] == N


def test_admin_accuracy_with_any_subset_of_store_fields(two_files, tmp_path, monkeypatch):
    import zarr

    keys = [f"{i:06d}" for i in range(N)]
    store = _store(tmp_path, keys, ['"FR"'] * N)
    g = zarr.open_group(store, mode="r+")
    g.attrs["meta_fields"] = ["unique_country"]  # a store with country labels only
    fake = types.ModuleType("reverse_geocoder")
    fake.search = lambda coords, mode=2, verbose=True: [{"cc": "FR", "admin1": "R", "admin2": "", "name": "c"} for _ in coords]
    monkeypatch.setitem(sys.modules, "reverse_geocoder", fake)
    (entry,) = run_evaluate(EvaluateConfig(predictions=(two_files[0],), store=store)).reports
    assert set(entry["admin"]) == {"country"} and entry["admin"]["country"] == {"n": N, "accuracy": 1.0}
    g.attrs["meta_fields"] = ["other"]
    with pytest.raises(GeopipeError, match=r"none of the meta fields for admin labels; available: \['other'\]"):
        run_evaluate(EvaluateConfig(predictions=(two_files[0],), store=store))

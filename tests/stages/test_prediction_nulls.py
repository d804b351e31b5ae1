"""Nulls, not NaN, for every value a predictions file did not compute: SQL and Arrow aggregates
skip nulls, NaN poisons them (duckdb avg() over the demo's own predictions was NaN)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geopipe.stages.predict import PredictConfig, run_predict
from tests.tiny_models import tiny_store, untrained_checkpoint

duckdb = pytest.importorskip("duckdb")

N, EVERY = 40, 5  # the demo predicts with --likelihood-every 5
LIKELIHOOD = ("log_likelihood", "neg_entropy_nats", "entropy_bits", "effective_area_km2", "hdr_rank")


def _nan_counts(path) -> dict:
    """Per float64 column: (NaN count, NULL count) as duckdb sees them."""
    floats = [f.name for f in pq.read_schema(path) if f.type == pa.float64()]
    sql = ", ".join(f"count(*) filter (where isnan({c})), count(*) filter (where {c} is null)" for c in floats)
    row = duckdb.sql(f"select {sql} from read_parquet('{path}')").fetchall()[0]
    return {c: (row[2 * i], row[2 * i + 1]) for i, c in enumerate(floats)}


def test_likelihood_every_writes_null_in_the_rows_it_skips(tmp_path):
    """Before: the skipped rows held NaN in the localizability columns (neg_entropy_nats, entropy_bits,
    effective_area_km2): duckdb avg() NaN. After: NULL there, finite aggregates, no NaN anywhere."""
    out = str(tmp_path / "p.parquet")
    run_predict(PredictConfig(checkpoint=untrained_checkpoint(tmp_path / "m"), store=tiny_store(tmp_path / "s.zarr", N), out=out,
                              steps=2, nll=True, localizability=16, likelihood_every=EVERY, device="cpu", progress=False))
    computed = math.ceil(N / EVERY)
    counts = _nan_counts(out)
    assert all(nan == 0 for nan, _ in counts.values()), counts
    for name in LIKELIHOOD:
        assert counts[name] == (0, N - computed), (name, counts[name])
    for name in ("lat", "lon", "true_lat", "true_lon", "distance_km"):
        assert counts[name] == (0, 0), name
    avg = duckdb.sql(f"select {', '.join(f'avg({c})' for c in LIKELIHOOD)}, count(log_likelihood) from read_parquet('{out}')").fetchall()[0]
    assert all(math.isfinite(v) for v in avg[:-1]) and avg[-1] == computed, avg
    # Arrow compute agrees: mean over the computed rows only
    ll = pq.read_table(out).column("log_likelihood")
    assert ll.null_count == N - computed and np.isfinite(pa.compute.mean(ll).as_py())


def test_every_optional_float_column_is_null_not_nan(tmp_path):
    """The writer's rule, for any producer (retrieval blocks, BayesCap re-scoring): NaN in an optional
    float column is written as null, as numpy or as Arrow input; non-optional lat/lon keep their values."""
    from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, replace_columns, write_predictions

    nan = np.array([1.0, np.nan, 3.0])
    table = predictions_table({"key": ["a", "b", "c"], "lat": [1.0, 2.0, 3.0], "lon": [4.0, 5.0, 6.0], "u_ratio12": nan,
                               "neg_entropy_nats": pa.array(nan), "region_mass": nan}, 3)
    for name in ("u_ratio12", "neg_entropy_nats", "region_mass"):
        assert table.column(name).to_pylist() == [1.0, None, 3.0], name
    path = tmp_path / "p.parquet"
    write_predictions(table, str(path), predictions_metadata({}, {}, {"version": "t"}))
    replace_columns(str(path), {"log_u": nan}, {"bayescap": {"checkpoint": "c"}})
    counts = _nan_counts(path)
    assert all(nan == 0 for nan, _ in counts.values()) and counts["log_u"] == (0, 1), counts

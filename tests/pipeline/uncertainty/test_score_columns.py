"""Uncertainty score columns are declared once (schemas/predictions.py UNCERTAINTY_SCORES) and
every producer and reader derives them from there."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from geopipe.schemas.predictions import PREDICTIONS_SCHEMA, SCORE_SOURCES, UNCERTAINTY_SCORES, score_columns


def test_the_schema_holds_every_declared_score_as_float64():
    names = [s.name for s in UNCERTAINTY_SCORES]
    assert len(set(names)) == len(names) and {s.source for s in UNCERTAINTY_SCORES} <= set(SCORE_SOURCES)
    for name in names:
        assert PREDICTIONS_SCHEMA.field(name).type == pa.float64() and PREDICTIONS_SCHEMA.field(name).nullable
    assert score_columns() == tuple(names) == score_columns("bayescap") + score_columns("retrieval")
    with pytest.raises(ValueError, match="unknown score source"):
        score_columns("nope")


def test_retrieval_scores_are_the_schemas_retrieval_columns():
    from geopipe.pipeline.uncertainty.scores import retrieval_scores

    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0, 1, (5, 4)), axis=1)
    ll = rng.uniform(-10, 10, (5, 4, 2))
    assert tuple(retrieval_scores(d, np.arange(20).reshape(5, 4), ll)) == score_columns("retrieval")


def test_bayescap_scores_are_the_schemas_bayescap_columns():
    from geopipe.pipeline.uncertainty.bayescap import BayesCapConfig, BayesCapMLP
    from geopipe.pipeline.uncertainty.mc_dropout import score_embeddings
    from geopipe.pipeline.uncertainty.scoring import SCORE_NAMES

    emb = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    scores = score_embeddings(BayesCapMLP(BayesCapConfig(8)), emb, passes=3)
    assert tuple(scores) == score_columns("bayescap") == SCORE_NAMES
    assert all(v.shape == (6,) and v.dtype == np.float64 for v in scores.values())


def test_failure_table_ranks_every_declared_score(tmp_path):
    """A predictions file with every score column filled gets a failure row per score."""
    from geopipe.pipeline.artifacts.predictions import predictions_table, write_predictions
    from geopipe.pipeline.eval.failure import failure_rows

    rng = np.random.default_rng(2)
    n = 40
    cols = {"key": [f"k{i}" for i in range(n)], "lat": rng.uniform(-60, 60, n), "lon": rng.uniform(-170, 170, n),
            "true_lat": rng.uniform(-60, 60, n), "true_lon": rng.uniform(-170, 170, n),
            **{name: rng.normal(size=n) for name in score_columns()}}
    path = str(tmp_path / "p.parquet")
    write_predictions(predictions_table(cols, n), path, {})
    rows = failure_rows("m", path, {k: np.asarray(cols[k]) for k in ("key", "lat", "lon", "true_lat", "true_lon")})
    assert {r["score"] for r in rows} == set(score_columns())

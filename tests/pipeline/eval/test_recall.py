"""Recall@K and geography against the uncertainty spec's oracles (docs/methods.md), float64."""

import json
import pathlib

import numpy as np
import pytest

from geopipe.pipeline.eval.recall import answerable, correct_at_k, haversine_m, recall_at_k, recall_summary

ORACLES = json.loads((pathlib.Path(__file__).parent / "uncertainty_oracles.json").read_text())


@pytest.mark.parametrize("case", ORACLES["F_haversine"], ids=lambda c: f"{c['meters']:.3f}m")
def test_haversine_metres_and_positive_flag(case):
    (a, b), (c, d) = case["p1"], case["p2"]
    m = float(haversine_m(a, b, c, d))
    assert m == pytest.approx(case["meters"], rel=1e-9)
    assert (m <= 25.0) == case["positive_25m"]


def _toy():
    g = ORACLES["G_recall_toy"]
    db, q = np.array(g["db_emb"]), np.array(g["q_emb"])
    sq = ((q[:, None, :] - db[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(sq, g["sq_l2"], rtol=1e-12)
    ranking = np.argsort(sq, axis=1, kind="stable")  # ties → lower database index
    assert ranking.tolist() == g["ranking"]
    dbxy, qxy = np.array(g["db_xy"]), np.array(g["q_xy"])
    geo = np.sqrt(((qxy[:, None, :] - dbxy[None, :, :]) ** 2).sum(-1))
    positives = [np.nonzero(row <= 25.0)[0].tolist() for row in geo]
    assert positives == g["positives"]
    ranked_dist = np.take_along_axis(geo, ranking, axis=1)
    answerable = np.array([bool(p) for p in positives])
    return g, ranked_dist, answerable


def test_recall_toy_both_conventions():
    g, dist, answerable = _toy()
    all_q = recall_at_k(dist, answerable, ks=(1, 2, 3), drop_unanswerable=False)
    ans = recall_at_k(dist, answerable, ks=(1, 2, 3))
    for k in (1, 2, 3):
        assert all_q[k] == pytest.approx(g["recall_all_queries"][f"R@{k}"], rel=1e-12)
        assert ans[k] == pytest.approx(g["recall_answerable_only"][f"R@{k}"], rel=1e-12)
    s = recall_summary(dist, answerable, ks=(1, 2, 3))
    assert s["n"] == 3 and s["n_unanswerable"] == 1 and s["recall"] == ans and s["recall_all"] == all_q


def test_correct_at_k_is_cumulative_and_nan_is_a_miss():
    d = np.array([[30.0, 10.0, np.nan], [np.nan, np.nan, np.nan]])
    hit = correct_at_k(d)
    assert hit.tolist() == [[False, True, True], [False, False, False]]
    assert recall_at_k(d, ks=(1, 2, 5)) == {1: 0.0, 2: 0.5, 5: 0.5}


def test_no_answerable_query_gives_none():
    assert recall_at_k(np.array([[100.0]]), answerable=[False], ks=(1,)) == {1: None}


def test_answerable_matches_brute_force_and_excludes_own_group():
    rng = np.random.default_rng(0)
    db = np.stack([45 + rng.uniform(0, 0.002, 300), 7 + rng.uniform(0, 0.002, 300)], axis=1)
    q = np.stack([45 + rng.uniform(-0.001, 0.003, 100), 7 + rng.uniform(-0.001, 0.003, 100)], axis=1)
    brute = (haversine_m(q[:, None, 0], q[:, None, 1], db[None, :, 0], db[None, :, 1]) <= 25.0).any(axis=1)
    np.testing.assert_array_equal(answerable(q, db), brute)
    assert 0 < brute.sum() < 100
    # leave-one-out: a record is not its own positive
    lone = np.array([[0.0, 0.0], [10.0, 10.0], [10.0, 10.0001]])
    g = np.arange(3)
    assert answerable(lone, lone, query_groups=g, db_groups=g).tolist() == [False, True, True]
    assert answerable(lone, lone).tolist() == [True, True, True]

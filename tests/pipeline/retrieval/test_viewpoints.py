"""Viewpoint pair mining: geo gate, captures, heading rule, calibrated visual filter, splits,
and the insufficient_pairs status."""

import numpy as np

from geopipe.pipeline.eval.recall import haversine_m
from geopipe.pipeline.retrieval.viewpoints import PairConfig, candidate_pairs, mine_pairs


def test_candidates_match_brute_force():
    rng = np.random.default_rng(0)
    ll = np.stack([45 + rng.uniform(0, 0.003, 300), 7 + rng.uniform(0, 0.003, 300)], axis=1)
    pairs, dist = candidate_pairs(ll, 25.0)
    d = haversine_m(ll[:, None, 0], ll[:, None, 1], ll[None, :, 0], ll[None, :, 1])
    i, j = np.nonzero(np.triu(d <= 25.0, k=1))
    assert sorted(map(tuple, pairs.tolist())) == sorted(zip(i.tolist(), j.tolist()))
    np.testing.assert_allclose(np.sort(dist), np.sort(d[i, j]))


def test_capture_heading_and_change_rules():
    ll = np.array([[45.0, 7.0], [45.0, 7.00001], [45.0, 7.00002], [45.0, 7.00003], [46.0, 7.0]])  # ≈ 0.8 m steps
    emb = np.eye(5, dtype=np.float32)
    heading = np.array([0.0, 30.0, 100.0, 2.0, 0.0])
    capture = np.array([0, 1, 2, 0, 3])
    ps = mine_pairs(emb, ll, heading, capture, cfg=PairConfig(min_pairs=1, min_pairable_fraction=0.0, val_fraction=0.0))
    got = sorted(map(tuple, ps.train.tolist()))
    # (0,1): Δh 30 ok; (0,2),(1,2),(2,3): Δh > 45; (0,3): same capture; (1,3): Δh 28 ok
    assert got == [(0, 1), (1, 3)] and ps.status == "ok" and ps.stats["headings"]


def test_visual_filter_and_insufficient_pairs():
    rng = np.random.default_rng(1)
    n = 400
    place = np.arange(n) // 2
    centre = np.stack([45 + (place % 20) * 0.01, 7 + (place // 20) * 0.01], axis=1)
    ll = centre + rng.normal(scale=2e-5, size=(n, 2))
    latent = rng.normal(size=(n // 2, 16))
    emb = latent[place] + 0.3 * rng.normal(size=(n, 16))
    emb[1::2][:50] = rng.normal(size=(50, 16))  # 50 partners show something else
    ps = mine_pairs(emb.astype(np.float32), ll, cfg=PairConfig(min_pairs=10))
    assert ps.stats["tau"] is not None and ps.stats["n_pairs"] <= 200 - 40
    none = mine_pairs(emb.astype(np.float32), ll, cfg=PairConfig(min_pairs=10, visual_filter="none"))
    assert 190 <= none.stats["n_pairs"] <= 200  # without capture ids, pairs closer than 0.5 m are duplicates
    far = mine_pairs(emb.astype(np.float32), ll * np.array([1.0, 1.0]) + np.arange(n)[:, None] * 0.01)
    assert far.status == "insufficient_pairs" and far.stats["n_pairs"] == 0 and far.train.shape == (0, 2)

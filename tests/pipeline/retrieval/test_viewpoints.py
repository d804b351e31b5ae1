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
    far = mine_pairs(emb.astype(np.float32), ll * np.array([1.0, 1.0]) + np.arange(n)[:, None] * 0.01, cfg=PairConfig(widen_to_m=25.0))
    assert far.status == "insufficient_pairs" and far.stats["n_pairs"] == 0 and far.train.shape == (0, 2)


def _photo_collection(n_places=60, per_place=12, spread_m=300.0, spacing_km=20.0, seed=0):
    """Records of real-photo stores: places far apart, photos of a place hundreds of metres apart
    (no two within 25 m), no headings, no capture ids; embeddings of one place alike."""
    rng = np.random.default_rng(seed)
    place = np.repeat(np.arange(n_places), per_place)
    centre = np.stack([40 + (np.arange(n_places) // 8) * spacing_km / 111.2, 5 + (np.arange(n_places) % 8) * spacing_km / 85.0], 1)
    ll = centre[place] + rng.normal(scale=spread_m / 111_195.0, size=(place.size, 2))
    emb = rng.normal(size=(n_places, 16))[place] + 0.5 * rng.normal(size=(place.size, 16))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), ll, place


def test_stores_without_headings_widen_to_place_pairs():
    emb, ll, place = _photo_collection()
    ps = mine_pairs(emb, ll, cfg=PairConfig(min_pairs=500))
    assert ps.status == "ok" and ps.stats["radius_m"] == 1000.0 and ps.stats["widened_from_m"] == 25.0
    assert ps.stats["tried"][0]["radius_m"] == 25.0 and ps.stats["tried"][0]["n_pairs"] < 500
    assert ps.stats["pair_kind"] == "place" and ps.stats["visual_filter"] == "none" and ps.stats["tau"] is None
    kept = np.concatenate([ps.train, ps.val])
    d = haversine_m(ll[kept[:, 0], 0], ll[kept[:, 0], 1], ll[kept[:, 1], 0], ll[kept[:, 1], 1])
    assert (d <= 1000.0).all() and (place[kept[:, 0]] == place[kept[:, 1]]).all()  # places 20 km apart never pair
    # the street-scale radius keeps its visual filter; widening off, or headings (a VPR store): no place pairs
    assert mine_pairs(emb, ll, cfg=PairConfig(min_pairs=500, widen_to_m=25.0)).status == "insufficient_pairs"
    vpr = mine_pairs(emb, ll, heading_deg=np.zeros(len(ll)), cfg=PairConfig(min_pairs=500))
    assert vpr.status == "insufficient_pairs" and vpr.stats["widened_from_m"] is None and len(vpr.stats["tried"]) == 1
    # a sparser collection goes on to the next place radius
    wide = mine_pairs(*_photo_collection(spread_m=3000.0)[:2], cfg=PairConfig(min_pairs=500))
    assert wide.status == "ok" and wide.stats["radius_m"] == 2500.0 and [t["radius_m"] for t in wide.stats["tried"]] == [25.0, 1000.0, 2500.0]


def test_max_pairs_keeps_a_seeded_subset():
    emb, ll, _ = _photo_collection()
    full = mine_pairs(emb, ll, cfg=PairConfig(min_pairs=10, val_fraction=0.0, pair_radius_m=1000.0))
    cut = mine_pairs(emb, ll, cfg=PairConfig(min_pairs=10, val_fraction=0.0, pair_radius_m=1000.0, max_pairs=100))
    assert cut.stats["n_pairs"] == 100 and cut.stats["n_found"] == full.stats["n_pairs"] > 100
    assert set(map(tuple, cut.train.tolist())) <= set(map(tuple, full.train.tolist()))

"""Ridge probes: a linear target is recovered (held-out R² ≈ 1), noise is not (≈ 0), a separable
category beats the majority class, headings and locations decode with their own errors."""

import numpy as np
import pytest

from geopipe.pipeline.inspection.probes import Gram, ProbeConfig, Ridge, run_probes, split_parts, target_kind

N, D = 1500, 24


@pytest.fixture(scope="module")
def probed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    latlon = np.stack([rng.uniform(-60, 60, N), rng.uniform(-180, 180, N)], axis=1)
    a = rng.normal(size=D)
    meta = {"linear": list(x @ a + 3.0), "noise": list(rng.normal(size=N)),
            "side": ["east" if v > 0 else "west" for v in x[:, 0]], "key": [f"k{i}" for i in range(N)],
            "heading_deg": list(np.rad2deg(np.arctan2(x[:, 1], x[:, 2])) % 360.0), "flag": [None] * N}
    results, skipped = run_probes(x, latlon, meta, ProbeConfig(block_m=0, seed=1))
    return {r.name: r for r in results}, skipped, a


def test_linear_target_is_recovered_and_noise_is_not(probed):
    res, _, a = probed
    assert res["linear"].metrics["r2_test"] > 0.999 and res["linear"].kind == "numeric"
    assert abs(res["noise"].metrics["r2_test"]) < 0.05
    w = res["linear"].directions["linear"]
    assert abs(float(w @ (a / np.linalg.norm(a)))) > 0.999 and np.linalg.norm(w) == pytest.approx(1.0, abs=1e-5)
    assert res["linear"].n_fit + res["linear"].n_test == N


def test_categorical_beats_majority_and_ids_are_skipped(probed):
    res, skipped, _ = probed
    side = res["side"].metrics
    assert side["acc_test"] > 0.9 > 0.6 > side["majority_test"] and side["n_classes"] == 2
    assert set(res["side"].directions) == {"side=east", "side=west"}
    assert "key" in skipped and "classes" in skipped["key"] and skipped["flag"] == "no values"


def test_heading_and_location(probed):
    res, _, _ = probed
    h = res["heading_deg"].metrics
    assert res["heading_deg"].kind == "circular" and h["error_unit"] == "deg"
    assert h["median_error_test"] < 10 < 60 < h["baseline_median_error"]
    loc = res["location"].metrics  # random locations: not decodable
    assert res["location"].kind == "location" and abs(loc["r2_test"]) < 0.05 and loc["error_unit"] == "km"


def test_spatial_blocks_keep_a_place_on_one_side():
    latlon = np.repeat(np.array([[45.0 + 0.01 * i, 7.0] for i in range(200)]), 4, axis=0)  # 4 views per place
    latlon[:, 1] += np.tile([0.0, 1e-6, 2e-6, 3e-6], 200)
    parts = split_parts(latlon, ProbeConfig(block_m=500.0, seed=0)).reshape(200, 4)
    assert (parts == parts[:, :1]).all() and set(np.unique(parts)) == {0, 1, 2}


def test_ridge_matches_lstsq_at_tiny_lambda_and_kinds():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(50, 5)).astype(np.float32), rng.normal(size=(50, 2))
    rows = np.arange(50)
    both = Gram.of(x, rows[:20], block=7) + Gram.of(x, rows[20:])
    assert np.allclose(both.g, x.astype(np.float64).T @ x, rtol=1e-5) and both.n == 50
    w, b = Ridge(both).fit(x, y, 1e-12)
    ref = np.linalg.lstsq(np.c_[x, np.ones(50)], y, rcond=None)[0]
    assert np.allclose(w, ref[:5], atol=1e-5) and np.allclose(b, ref[5], atol=1e-5)
    cfg = ProbeConfig()
    assert target_kind("x", [1, 2, None], cfg) == ("numeric", "") and target_kind("x", [True, False], cfg)[0] == "categorical"
    assert target_kind("x", [1, "a"], cfg)[0] is None and target_kind("heading", [1.0, 2.0], cfg)[0] == "circular"

"""Adaptive binning traces and binned rank statistics against the spec's oracles."""

import json
import pathlib

import numpy as np
import pytest

from geopipe.pipeline.eval.binning import BinningConfig, adaptive_bin_edges, bin_counts, binned_rank_stats, r2_on_ranks, rankdata, spearman

ORACLES = json.loads((pathlib.Path(__file__).parent / "uncertainty_oracles.json").read_text())


def _cfg(d, **kw):
    return BinningConfig(min_num_samples=d["min_num_samples"], max_num_bins=d["max_num_bins"],
                         min_num_bins=d["min_num_bins"], **kw)


def test_small_trace_one_pass():
    d = ORACLES["I2_binning_small"]
    edges = adaptive_bin_edges(d["u"], _cfg(d))
    np.testing.assert_allclose(edges, d["final_edges"], atol=1e-12)
    assert bin_counts(np.array(d["u"]), edges).tolist() == d["final_counts"]
    first = np.linspace(0, 1, 6)
    np.testing.assert_allclose(first, d["initial_edges"])
    assert bin_counts(np.array(d["u"]), first).tolist() == d["initial_counts"]


def test_last_bin_underfilled_merges_left():
    d = ORACLES["I4_binning_extra"]["last_bin_small"]
    u = np.array(d["u"])
    assert bin_counts(u, np.linspace(0.01, 1.0, 6)).tolist() == d["initial_counts"]
    edges = adaptive_bin_edges(u, _cfg(d))
    np.testing.assert_allclose(edges, d["final_edges"], atol=1e-12)
    assert bin_counts(u, edges).tolist() == d["final_counts"]


@pytest.mark.parametrize("faithful", [True, False])
def test_min_bins_check_faithful_and_corrected(faithful):
    d = ORACLES["I4_binning_extra"][f"min_bins_check_faithful={faithful}"]
    u = np.array(d["u"])
    assert bin_counts(u, np.linspace(0, 1, 6)).tolist() == d["initial_counts"]
    edges = adaptive_bin_edges(u, _cfg(d, faithful_min_bins_check=faithful))
    np.testing.assert_allclose(edges, d["final_edges"], atol=1e-12)
    assert bin_counts(u, edges).tolist() == d["final_counts"]


def test_eighty_value_example():
    d = ORACLES["I_adaptive_binning"]
    inp = d["inputs"]
    u = np.array(inp["uncertainties"])
    assert bin_counts(u, np.linspace(u.min(), u.max(), 11)).tolist() == d["initial_counts_10_equal_bins"]
    cfg = BinningConfig(min_num_samples=inp["min_num_samples"], max_num_bins=inp["max_num_bins"],
                        min_num_bins=inp["min_num_bins"], min_width_factor=inp["min_width_factor"],
                        max_merge_attempts=inp["max_merge_attempts"])
    res = binned_rank_stats(u, inp["correct"], cfg)
    np.testing.assert_allclose(res["edges"], d["edges"], atol=1e-9)
    assert res["n"].tolist() == [b["n"] for b in d["bins"]]
    np.testing.assert_allclose(res["mean_u"], [b["mean_u"] for b in d["bins"]], atol=1e-9)
    np.testing.assert_allclose(res["mean_correct"], [b["mean_r1"] for b in d["bins"]], atol=1e-9)
    np.testing.assert_allclose(rankdata(res["mean_u"]), d["uncertainty_levels"])
    np.testing.assert_allclose(rankdata(res["mean_correct"]), d["recall_ranks"])
    assert res["spearman"] == pytest.approx(d["spearman"], rel=1e-12)
    assert res["r2_ols"] == pytest.approx(d["r2_ols_on_ranks"], rel=1e-12)
    assert res["r2_direct"] == pytest.approx(d["r2_direct"], rel=1e-12)


def test_identities_without_ties():
    d = ORACLES["I3_identity"]
    s = spearman(d["x"], d["y"])
    assert s == pytest.approx(d["spearman"], rel=1e-12)
    r2 = r2_on_ranks(d["x"], d["y"])
    assert r2["ols"] == pytest.approx(d["r2_ols"], rel=1e-12) and r2["ols"] == pytest.approx(s * s, rel=1e-12)
    assert r2["direct"] == pytest.approx(d["r2_direct"], rel=1e-12) and r2["direct"] == pytest.approx(-1 - 2 * s, rel=1e-12)


def test_all_equal_scores_give_one_bin():
    res = binned_rank_stats(np.full(30, 0.7), np.arange(30) % 2)
    assert res["edges"].tolist() == [0.7, 0.7] and res["bins"] == 1 and res["n"].tolist() == [30]
    assert res["spearman"] is None and res["r2_ols"] is None


def test_rankdata_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    v = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 5.0])
    np.testing.assert_array_equal(rankdata(v), st.rankdata(v))

"""Sparsification, AUSC/AUSE/AURG and failure-detection AUCs against the spec's oracles."""

import json
import pathlib

import numpy as np
import pytest

from geopipe.pipeline.eval.sparsification import auprc, auroc, ausc_warburg, failure_detection, sparsification

ORACLES = json.loads((pathlib.Path(__file__).parent / "uncertainty_oracles.json").read_text())["H_sparsification"]
KEYS = {"AUSC": "ausc", "AUSC_oracle": "ausc_oracle", "AUSC_random": "ausc_random", "AUSE": "ause", "AURG": "aurg",
        "AUSC_normalised": "ausc_norm"}


@pytest.mark.parametrize("steps", [10, 100])
def test_sparsification_oracle(steps):
    want = ORACLES[f"F={steps}"]
    res = sparsification(ORACLES["inputs"]["correct"], ORACLES["inputs"]["uncertainty"], steps=steps)
    for ours_name, key in KEYS.items():
        assert res[key] == pytest.approx(want[ours_name], rel=1e-9, abs=1e-12), ours_name
    if want["curve"] is not None:
        assert res["removed"].tolist() == want["removed_counts"]
        np.testing.assert_allclose(res["curve"], want["curve"], atol=1e-9)
        np.testing.assert_allclose(res["oracle"], want["oracle"], atol=1e-9)
    assert res["ausc"] <= res["ausc_oracle"] + 1e-12


def test_warburg_convention():
    inp = ORACLES["inputs"]
    assert ausc_warburg(inp["correct"], inp["uncertainty"]) == pytest.approx(ORACLES["warburg_repo_convention"]["AUSC"], rel=1e-9)


def test_ties_keep_query_order():
    t = ORACLES["ties_example"]
    res = sparsification(t["correct"], t["uncertainty"], steps=t["F"])
    assert res["removed"].tolist() == t["removed"]
    np.testing.assert_allclose(res["curve"], t["curve"], atol=1e-12)


def test_log_score_gives_the_same_curve():
    inp = ORACLES["inputs"]
    a = sparsification(inp["correct"], inp["uncertainty"], steps=10)
    b = sparsification(inp["correct"], np.log(inp["uncertainty"]), steps=10)
    np.testing.assert_array_equal(a["curve"], b["curve"])


def test_auroc_auprc_closed_forms():
    correct = [1, 1, 0, 0]
    assert auroc(correct, [0.1, 0.2, 0.8, 0.9]) == 1.0  # failures have the highest scores
    assert auroc(correct, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc(correct, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert auprc(correct, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auprc(correct, [0.5] * 4) == 0.5  # tied scores enter together: precision = base rate
    assert auroc([1, 1], [0.1, 0.2]) is None and auprc([1, 1], [0.1, 0.2]) is None
    rng = np.random.default_rng(0)
    c = rng.integers(0, 2, 500)
    s = rng.normal(size=500)
    sc = pytest.importorskip("scipy.stats")
    u_stat = sc.mannwhitneyu(s[c == 0], s[c == 1]).statistic
    assert failure_detection(c, s)["auroc"] == pytest.approx(u_stat / ((c == 0).sum() * (c == 1).sum()), rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no queries"):
        sparsification([], [])
    with pytest.raises(ValueError, match="NaN"):
        sparsification([1, 0], [0.1, np.nan])

"""The standard statistics are the libraries' (scikit-learn AUROC / average precision, scipy
ranks and Spearman), with geopipe's conventions on top (None for one class or a constant side);
the ridge probes keep their closed form (one eigendecomposition serves every λ and target, the
Gram matrix summed in float32 blocks) and are checked here against scikit-learn's Ridge and
RidgeCV on the same rows and the same validation split, and against GroupKFold's rule that a
group (a spatial block) never straddles two parts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import Ridge as SkRidge
from sklearn.linear_model import RidgeCV
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import PredefinedSplit

from geopipe.pipeline.eval.binning import rankdata, spearman
from geopipe.pipeline.eval.sparsification import auprc, auroc
from geopipe.pipeline.inspection.probes import Gram, ProbeConfig, Ridge, run_probes, split_parts
from geopipe.pipeline.retrieval.split import spatial_blocks


@pytest.mark.parametrize("seed", range(8))
def test_failure_detection_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    correct = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(float)
    correct[:2] = [0.0, 1.0]  # both classes
    u = np.round(rng.normal(size=n) - 0.8 * correct, 1)  # rounded: many ties
    fail = correct < 0.5
    assert auroc(correct, u) == pytest.approx(roc_auc_score(fail, u), abs=1e-12)
    assert auprc(correct, u) == pytest.approx(average_precision_score(fail, u), abs=1e-12)
    # the Mann–Whitney reading of AUROC, from scipy
    mw = stats.mannwhitneyu(u[fail], u[~fail]).statistic / (fail.sum() * (~fail).sum())
    assert auroc(correct, u) == pytest.approx(mw, abs=1e-12)


def test_one_class_is_none_not_a_number():
    assert auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None and auprc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert auroc([0, 0, 0], [0.1, 0.2, 0.3]) is None and auprc([0, 0, 0], [0.1, 0.2, 0.3]) is None


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_spearman_equal_scipy(seed):
    rng = np.random.default_rng(seed)
    x, y = np.round(rng.normal(size=60), 1), np.round(rng.normal(size=60), 1)
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x, method="average"))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(x, np.ones(60)) is None and spearman([1.0], [2.0]) is None


def test_ridge_equals_sklearn_ridge_on_centred_rows():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    y = x.astype(np.float64) @ rng.normal(size=(12, 3)) + rng.normal(size=(300, 3)) + 2.0
    z = x - x.mean(axis=0)
    r = Ridge(Gram.of(z, np.arange(300)))
    for lam in (1e-4, 1e-1, 10.0):
        w, b = r.fit(z, y, lam)
        sk = SkRidge(alpha=lam * r.scale, fit_intercept=True).fit(z.astype(np.float64), y)
        np.testing.assert_allclose(w, sk.coef_.T, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(b, sk.intercept_, rtol=2e-4, atol=2e-5)


def test_lambda_choice_equals_ridgecv_on_the_same_validation_split():
    rng = np.random.default_rng(5)
    n, d = 900, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    latlon = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], axis=1)
    target = x.astype(np.float64) @ rng.normal(size=d) + rng.normal(scale=4.0, size=n)  # noisy: λ matters
    cfg = ProbeConfig(block_m=0, seed=3, lambdas=(1e-3, 1e-1, 1.0, 10.0, 100.0, 1000.0))
    (res,), _ = run_probes(x, latlon, {"t": list(target)}, cfg, location=False)
    parts = split_parts(latlon, cfg)
    rows = np.flatnonzero(parts < 2)  # train (-1 = always fitted) and validation (fold 0) as in the probe
    z = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)
    scale = Ridge(Gram.of(z, np.flatnonzero(parts == 0))).scale
    cv = RidgeCV(alphas=[lam * scale for lam in cfg.lambdas], cv=PredefinedSplit(np.where(parts[rows] == 1, 0, -1)),
                 scoring="r2").fit(z[rows].astype(np.float64), target[rows])
    assert res.lam == cfg.lambdas[[lam * scale for lam in cfg.lambdas].index(cv.alpha_)]


def test_spatial_blocks_are_groups_that_never_straddle_parts():
    rng = np.random.default_rng(6)
    centres = np.stack([rng.uniform(40, 50, 300), rng.uniform(0, 10, 300)], axis=1)
    latlon = np.repeat(centres, 5, axis=0) + rng.normal(scale=1e-4, size=(1500, 2))  # 5 views ~10 m apart
    cfg = ProbeConfig(block_m=500.0, seed=2)
    parts, groups = split_parts(latlon, cfg), spatial_blocks(latlon, cfg.block_m)
    _, inv = np.unique(groups, return_inverse=True, axis=0 if np.ndim(groups) > 1 else None)
    inv = inv.reshape(-1)
    for g in np.unique(inv):  # GroupKFold's invariant: one group, one part
        assert np.unique(parts[inv == g]).size == 1
    assert set(np.unique(parts)) == {0, 1, 2}

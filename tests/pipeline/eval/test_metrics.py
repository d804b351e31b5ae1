"""Metrics (docs/methods.md#metrics) against reference values (haversine, GeoScore, densities, PRDC) and
invariants, float64."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch

import geopipe.pipeline.eval.metrics as metrics
import geopipe.pipeline.eval.prdc as prdc_mod
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.admin import admin_accuracy, is_missing_label, reverse_geocode_labels
from geopipe.pipeline.eval.calibration import CALIBRATION_LEVELS, calibration_table, hdr_rank
from geopipe.pipeline.eval.metrics import constant_baseline, distance_metrics, geoscore, localizability_summary, nll_summary
from geopipe.pipeline.eval.prdc import prdc
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz

PARIS, NEW_YORK = (48.8566, 2.3522), (40.7128, -74.0060)


def _xyz(latlon) -> np.ndarray:
    return latlon_to_xyz(torch.tensor(latlon, dtype=torch.float64)).numpy()


def test_haversine_paris_new_york_scaled_oracle():
    # the reference values use R = 6371 km; geopipe uses the mean radius 6371.0088: distances scale linearly.
    expected = 5837.240904 * EARTH_RADIUS_KM / 6371.0
    assert haversine_km(*PARIS, *NEW_YORK) == pytest.approx(expected, abs=2e-6)


@pytest.mark.parametrize("d, score", [(0.0, 5000.0), (100.0, 4676.010152), (1000.0, 2558.729726),
                                      (2500.0, 936.711883), (5837.240904, 100.149897)])
def test_geoscore_oracles(d, score):
    assert float(geoscore(d)) == pytest.approx(score, abs=1e-6)


def test_distance_metrics_mean_median_and_missing_truth():
    pred = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0], [5.0, 5.0]])
    true = np.array([[0.0, 1.0], [0.0, 3.0], [10.0, 10.0], [np.nan, np.nan]])
    out = distance_metrics(pred[:, 0], pred[:, 1], true[:, 0], true[:, 1])
    d = haversine_km(pred[:3, 0], pred[:3, 1], true[:3, 0], true[:3, 1])
    assert out["n"] == 3
    assert out["mean_km"] == pytest.approx(d.mean(), rel=1e-12)
    assert out["median_km"] == pytest.approx(np.median(d), rel=1e-12)
    assert out["geoscore"] == pytest.approx(np.mean(5000 * np.exp(-d / 1492.7)), rel=1e-12)
    assert out["acc_1km"] == pytest.approx(1 / 3)  # only the exact hit


def test_distance_accuracy_thresholds_are_strict(monkeypatch):
    radii = np.array([1.0, 25.0, 200.0, 750.0, 2500.0])
    monkeypatch.setattr(metrics, "haversine_km", lambda *a: radii.copy())
    z = np.zeros(5)
    at = distance_metrics(z, z, z, z)
    assert [at[f"acc_{r}km"] for r in (1, 25, 200, 750, 2500)] == [0.0, 0.2, 0.4, 0.6, 0.8]
    below = np.nextafter(radii, 0.0)
    monkeypatch.setattr(metrics, "haversine_km", lambda *a: below.copy())
    just = distance_metrics(z, z, z, z)
    assert [just[f"acc_{r}km"] for r in (1, 25, 200, 750, 2500)] == [0.2, 0.4, 0.6, 0.8, 1.0]


def test_distance_metrics_rejects_nan_prediction_and_handles_no_truth():
    with pytest.raises(ValueError, match="row 1"):
        distance_metrics([0.0, np.nan], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0])
    empty = distance_metrics([1.0], [1.0], [np.nan], [np.nan])
    assert empty["n"] == 0 and empty["geoscore"] is None and empty["acc_25km"] is None


REAL = [(0, 0), (0, 10), (10, 0), (45, 45)]
FAKE = [(0, 1), (1, 9), (-30, 100), (44, 46)]


@pytest.mark.parametrize("k, expected", [(1, (0.75, 1.0, 1.25, 0.75)), (3, (0.75, 1.0, 0.8333333, 1.0))])
def test_prdc_toy_oracle(k, expected):
    out = prdc(_xyz(REAL), _xyz(FAKE), k=k)
    got = (out["precision"], out["recall"], out["density"], out["coverage"])
    assert got == pytest.approx(expected, abs=1e-7)
    assert (out["k"], out["chunks"], out["n_real"], out["n_fake"]) == (k, 1, 4, 4)


def test_prdc_comparisons_are_strict_at_exact_ties():
    # On-axis points give bitwise-exact dot products, so D_ij == r_i ties are real ties here:
    # duplicated real (0,0) has radius 0 and real (0,10), (10,0) have radius exactly 10°.
    real = [(0, 0), (0, 0), (0, 10), (10, 0)]
    fake = [(0, 0), (0, 5), (20, 20), (0, 10)]
    out = prdc(_xyz(real), _xyz(fake), k=1)
    assert (out["precision"], out["recall"], out["density"], out["coverage"]) == (0.5, 1.0, 0.5, 0.25)
    # every fake radius is exactly 10°; reals (0,-10) and (-10,0) sit exactly 10° from fake (0,0)
    ties = prdc(_xyz([(0, -10), (-10, 0), (0, 0)]), _xyz([(0, 0), (0, 10), (10, 0)]), k=1)
    assert ties["recall"] == pytest.approx(1 / 3, abs=1e-15)


def _prdc_bruteforce(real_ll, fake_ll, k):
    """Independent reference: sklearn-style haversine angles, explicit loops over sets."""
    def ang(a, b):
        p1, l1 = np.deg2rad(a[:, None, 0]), np.deg2rad(a[:, None, 1])
        p2, l2 = np.deg2rad(b[None, :, 0]), np.deg2rad(b[None, :, 1])
        h = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
        return 2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))
    rr, ff, d = ang(real_ll, real_ll), ang(fake_ll, fake_ll), ang(real_ll, fake_ll)
    r_r = np.sort(rr, axis=1)[:, k]  # column 0 is the point itself
    r_f = np.sort(ff, axis=1)[:, k]
    inside = d < r_r[:, None]
    return (inside.any(0).mean(), (d < r_f[None, :]).any(1).mean(), inside.sum() / (k * len(fake_ll)), inside.any(1).mean())


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_bruteforce_with_small_blocks(monkeypatch, k):
    rng = np.random.default_rng(k)
    real = np.column_stack([rng.uniform(-60, 60, 150), rng.uniform(-180, 180, 150)])
    fake = np.column_stack([rng.uniform(-30, 70, 120), rng.uniform(-100, 100, 120)])
    monkeypatch.setattr(prdc_mod, "_BLOCK_ELEMS", 97)  # force many ragged blocks
    out = prdc(_xyz(real), _xyz(fake), k=k)
    got = (out["precision"], out["recall"], out["density"], out["coverage"])
    assert got == pytest.approx(_prdc_bruteforce(real, fake, k), abs=1e-12)


def test_prdc_flags_truths_with_collapsed_radii():
    """Four photos of each place a few metres apart: the k-th neighbour of a truth (k = 3) is
    another photo of its place, its radius collapses and P, D, C fall to ~0 — said, not hidden."""
    from geopipe.pipeline.eval.prdc import prdc_collapse_note
    from geopipe.pipeline.eval.table import format_table

    rng = np.random.default_rng(3)
    places = np.column_stack([rng.uniform(-60, 60, 40), rng.uniform(-180, 180, 40)])
    views = np.repeat(places, 4, axis=0) + rng.normal(scale=2e-5, size=(160, 2))  # about 2 m apart
    fake = views + rng.normal(scale=0.5, size=views.shape)  # predictions ~50 km off
    multi = prdc(_xyz(views), _xyz(fake), k=3)
    assert multi["collapsed_real"] == 1.0 and multi["precision"] < 0.05
    single = prdc(_xyz(places), _xyz(fake[::4]), k=3)
    assert single["collapsed_real"] == 0.0 and single["precision"] > 0.5
    entry = lambda name, p: {"name": name, "kind": "model", "method": "rfm", "n": 160, "prdc": p}  # noqa: E731
    assert prdc_collapse_note([entry("one", single)]) is None
    note = prdc_collapse_note([entry("one", single), entry("multi", multi)])
    assert note.startswith("PRDC understates P, D and C: 100% of the true locations of 'multi'")
    assert format_table([entry("one", single), entry("multi", multi)]).splitlines()[-1] == note


def test_prdc_chunks_average_contiguous_pieces():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    whole = prdc(real, fake, k=3, chunks=2)
    a, b = prdc(real[:25], fake[:25], k=3), prdc(real[25:], fake[25:], k=3)
    for name in ("precision", "recall", "density", "coverage"):
        assert whole[name] == pytest.approx((a[name] + b[name]) / 2, abs=1e-15)
    assert prdc(real, fake, k=3, chunks=3)["chunks"] == 3  # sizes 17, 17, 16
    with pytest.raises(ValueError, match="chunks"):
        prdc(real, fake[:40], k=3, chunks=2)
    with pytest.raises(ValueError, match="more than k"):
        prdc(real[:3], fake[:3], k=3)


def _gaussian_ranks(rng, n_records, n_samples, truth_scale):
    """HDR ranks for 1-D Gaussian predictions N(μ, σ²); the truth is drawn with σ·truth_scale."""
    mu = rng.normal(size=n_records)
    sigma = rng.uniform(0.5, 2.0, n_records)
    logp = lambda x: -0.5 * ((x - mu[:, None]) / sigma[:, None]) ** 2 - np.log(sigma[:, None])  # noqa: E731
    samples = mu[:, None] + sigma[:, None] * rng.normal(size=(n_records, n_samples))
    truth = mu + truth_scale * sigma * rng.normal(size=n_records)
    return hdr_rank(logp(truth[:, None])[:, 0], logp(samples))


def test_calibration_is_diagonal_for_a_calibrated_model():
    ranks = _gaussian_ranks(np.random.default_rng(0), 4000, 256, truth_scale=1.0)
    table = calibration_table(ranks)
    assert table["levels"] == pytest.approx(list(CALIBRATION_LEVELS))
    assert table["coverage"] == pytest.approx(table["levels"], abs=0.035)
    assert table["error"] < 0.02


def test_calibration_flags_an_overconfident_model():
    table = calibration_table(_gaussian_ranks(np.random.default_rng(1), 4000, 256, truth_scale=2.0))
    assert all(c < p for c, p in zip(table["coverage"], table["levels"]))
    assert table["error"] > 0.1


@pytest.mark.parametrize("n_samples", [50, 47])
def test_calibration_equals_the_a9_quantile_definition(n_samples):
    # the truth is covered at level p when its log density exceeds the (1 − p) quantile of the
    # sample log densities; inverted-CDF quantile = order statistic ⌈(1 − p)N⌉, in exact integers
    # (np.quantile's float (1 − p)·N can round past an integer, e.g. 0.3·50 → 15.000000000000002).
    rng = np.random.default_rng(n_samples)
    true_lp, sample_lp = rng.normal(size=300), rng.normal(size=(300, n_samples))
    table = calibration_table(hdr_rank(true_lp, sample_lp))
    ordered = np.sort(sample_lp, axis=1)
    for i, (p, cov) in enumerate(zip(table["levels"], table["coverage"]), start=1):
        assert p == pytest.approx(i / 10, abs=1e-15)
        m = -(-(10 - i) * n_samples // 10)  # ⌈(1 − p)N⌉
        assert cov == pytest.approx(np.mean(true_lp > ordered[:, m - 1]), abs=1e-15)


def test_calibration_validates_and_skips_nan():
    assert calibration_table([np.nan, 0.05])["n"] == 1
    assert calibration_table([np.nan])["error"] is None
    with pytest.raises(ValueError, match="hdr_rank"):
        calibration_table([1.5])


def test_nll_bits_per_dim_of_uniform_sphere():
    out = nll_summary(np.full(7, -math.log(4 * math.pi)), "sphere")
    assert out["nll_bits_per_dim"] == pytest.approx(1.2171653765, abs=1e-10)
    assert out["nll_nats"] == pytest.approx(2.5310242470, abs=1e-10)
    assert out["space"] == "sphere" and out["n"] == 7
    r3 = nll_summary([-2.8268155996, np.nan], "r3")  # standard normal density at a reference point, NaN skipped
    assert r3["n"] == 1 and r3["nll_bits_per_dim"] == pytest.approx(1.3594109490, abs=1e-9)
    with pytest.raises(ValueError, match="unknown density space"):
        nll_summary([0.0], "plane")


def test_localizability_of_uniform_sphere_is_the_earth_area():
    out = localizability_summary(np.full(5, -math.log(4 * math.pi)))
    assert out["median_effective_area_km2"] == pytest.approx(4 * math.pi * EARTH_RADIUS_KM**2, rel=1e-12)
    assert out["mean_entropy_bits"] == pytest.approx(math.log2(4 * math.pi), rel=1e-12)
    assert out["mean_neg_entropy_nats"] == pytest.approx(-math.log(4 * math.pi), rel=1e-12)


def test_constant_baseline_mean_direction():
    lat, lon = constant_baseline([[15.0, 20.0], [5.0, 20.0]])  # symmetric on one meridian
    assert (lat, lon) == pytest.approx((10.0, 20.0), abs=1e-9)
    with pytest.raises(ValueError, match="no mean direction"):
        constant_baseline([[0.0, 0.0], [0.0, 180.0]])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        constant_baseline(np.zeros((0, 2)))


def test_admin_accuracy_excludes_missing_truths():
    truth = {"country": ["FR", "nan", "NaN", "", None, "US", "DE"]}
    pred = {"country": ["FR", "FR", "FR", "FR", "FR", "CA", None]}
    assert admin_accuracy(truth, pred) == {"country": {"n": 3, "accuracy": pytest.approx(1 / 3)}}
    assert is_missing_label(float("nan")) and not is_missing_label("Nantes")
    assert admin_accuracy({"city": ["nan"]}, {"city": ["x"]})["city"]["accuracy"] is None


def test_reverse_geocoder_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "reverse_geocoder", None)  # import raises ImportError
    with pytest.raises(GeopipeError, match=r"reverse geocoding of the predicted points.*pip install 'geopipe-geolocation\[geocode\]'"):
        reverse_geocode_labels([48.85], [2.35])


def test_reverse_geocode_label_formats(monkeypatch):
    fake = types.ModuleType("reverse_geocoder")
    hit = {"cc": "FR", "admin1": "Ile-de-France", "admin2": "Paris", "name": "Paris"}
    fake.search = lambda coords, mode=2, verbose=True: [hit for _ in coords]
    monkeypatch.setitem(sys.modules, "reverse_geocoder", fake)
    out = reverse_geocode_labels([48.85, 48.86], [2.35, 2.36], ("country", "region", "sub-region", "city"))
    assert out["country"] == ["FR", "FR"]
    assert out["region"][0] == "Ile-de-France_FR"
    assert out["sub-region"][0] == "Paris_Ile-de-France_FR"
    assert out["city"][1] == "Paris_Paris_Ile-de-France_FR"

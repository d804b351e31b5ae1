"""Training-free uncertainty scores: closed-form cases and orientation (higher = more uncertain)."""

import math

import numpy as np

from geopipe.pipeline.uncertainty.scores import retrieval_scores


def test_retrieval_scores_closed_forms():
    d = np.array([[0.1, 0.2, 0.4], [0.3, 0.3, 0.5], [0.2, np.nan, np.nan]])
    idx = np.array([[0, 1, 2], [3, 4, 5], [6, -1, -1]])
    ll = np.array([[[45.0, 7.0], [45.0001, 7.0], [45.0, 7.0]],  # all within 25 m of the top-1
                   [[45.0, 7.0], [46.0, 7.0], [45.0, 8.0]],  # scattered
                   [[10.0, 10.0], [np.nan, np.nan], [np.nan, np.nan]]])
    s = retrieval_scores(d, idx, ll)
    np.testing.assert_allclose(s["u_dist1"], [0.1, 0.3, 0.2])
    np.testing.assert_allclose(s["u_ratio12"][:2], [0.5, 1.0])
    assert math.isnan(s["u_ratio12"][2])
    np.testing.assert_allclose(s["u_geo_inconsistency"], [0.0, 2 / 3, 0.0])
    assert s["u_spread_km"][0] < 0.02 and s["u_spread_km"][1] > s["u_spread_km"][0] and s["u_spread_km"][2] == 0


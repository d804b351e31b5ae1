"""Prototype summaries on toys with known answers: medoid, members, geo-purity, spread, headings."""

import numpy as np
import pytest

from geopipe.pipeline.inspection.prototypes import cluster_prototypes, heading_spread_deg, top_members


def test_purity_spread_and_members_on_a_toy():
    # cluster 0: five records at one spot and one 10 km north; cluster 1: two records 100 km apart
    m_per_deg = 111_195.0
    lat0 = [0.0, 0.0, 0.0, 0.0, 0.0, 10_000 / m_per_deg]
    latlon = np.array([[x, 0.0] for x in lat0] + [[0.0, 10.0], [100_000 / m_per_deg, 10.0]])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    cos = np.array([0.5, 0.9, 0.8, 0.7, 0.6, 0.95, 0.99, 0.3], dtype=np.float32)
    p = cluster_prototypes(labels, cos, latlon, 2, n_members=3, purity_radius_m=25.0, purity_km=(20, 200))
    assert p.medoid.tolist() == [5, 6] and p.sizes.tolist() == [6, 2]
    assert p.members[0].tolist() == [1, 2, 3] and p.members[1].tolist() == [7, -1, -1] and np.isnan(p.member_cos[1, 1])
    # the medoid of cluster 0 is the outlier 10 km north: only itself within 25 m, all within 20 km
    assert p.purity["25m"].tolist() == pytest.approx([1 / 6, 0.5])
    assert p.purity["20km"].tolist() == pytest.approx([1.0, 0.5]) and p.purity["200km"].tolist() == pytest.approx([1.0, 1.0])
    # spread: the median distance to the spherical mean (cluster 1: both 50 km from the middle)
    assert p.spread_km[1] == pytest.approx(50.0, rel=1e-3)
    assert p.spread_km[0] == pytest.approx(10.0 / 6, rel=0.01)
    assert p.mean_latlon[1, 1] == pytest.approx(10.0) and p.heading_spread_deg is None


def test_heading_spread_is_circular():
    labels = np.array([0, 0, 1, 1, 2])
    h = np.array([350.0, 10.0, 0.0, 180.0, np.nan])
    out = heading_spread_deg(labels, h, 4)
    assert out[0] == pytest.approx(np.rad2deg(np.sqrt(-2 * np.log(np.cos(np.deg2rad(10))))), rel=1e-6)  # not 170°
    assert out[1] > 300 and np.isnan(out[2]) and np.isnan(out[3])  # opposite headings: R = 0


def test_top_members_ties_go_to_the_lower_row():
    rows, vals = top_members(np.array([1, 0, 1, 1]), np.array([0.5, 0.1, 0.5, 0.9]), 2, 2)
    assert rows.tolist() == [[1, -1], [3, 0]] and vals[1].tolist() == pytest.approx([0.9, 0.5])

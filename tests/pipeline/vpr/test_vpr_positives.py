"""Positives in UTM metres against a brute-force oracle (boundary inclusive), hits, CosPlace classes."""

import numpy as np

from geopipe.pipeline.vpr.classes import class_pairs, cosplace_classes
from geopipe.pipeline.vpr.positives import positives_per_query, utm_answerable, utm_hits


def _oracle(q, db, r):
    d = np.hypot(q[:, None, 0] - db[None, :, 0], q[:, None, 1] - db[None, :, 1])
    return [np.flatnonzero(row <= r) for row in d]


def test_positives_equal_the_brute_force_oracle_with_the_boundary_inclusive():
    rng = np.random.default_rng(0)
    db = np.round(rng.uniform(0, 400, (600, 2)), 2) + [584000.0, 4477000.0]
    q = np.round(rng.uniform(0, 400, (200, 2)), 2) + [584000.0, 4477000.0]
    q[:3] = db[:3] + [[15.0, 20.0], [-7.0, 24.0], [25.0, 0.0]]  # exactly 25 m (3-4-5, 7-24-25 triangles)
    q[3] = db[3] + [15.0, 20.01]  # 25.008 m
    db[4] = np.nan  # a record without a position is nobody's positive
    got, want = positives_per_query(q, db, 25.0), _oracle(q, db, 25.0)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    assert all(i in got[i] for i in range(3)) and 3 not in got[3]
    assert np.array_equal(utm_answerable(q, db), np.array([w.size > 0 for w in want]))


def test_groups_exclude_own_capture_and_nan_queries_match_nothing():
    db = np.array([[0.0, 0.0], [10.0, 0.0], [100.0, 0.0]])
    q = np.array([[1.0, 0.0], [np.nan, np.nan]])
    assert [p.tolist() for p in positives_per_query(q, db, 25.0, np.array([7, 8]), np.array([7, 9, 9]))] == [[1], []]


def test_hits_are_cumulative_and_nan_neighbours_never_hit():
    q = np.array([[0.0, 0.0], [0.0, 0.0]])
    nb = np.array([[[30.0, 0.0], [25.0, 0.0], [np.nan, np.nan]], [[np.nan, np.nan], [26.0, 0.0], [0.0, 1.0]]])
    assert utm_hits(q, nb).tolist() == [[False, True, True], [False, False, True]]


def test_cosplace_classes_and_their_pairs():
    en = np.array([[584001.0, 4477001.0], [584009.9, 4477009.9], [584010.0, 4477001.0], [584002.0, 4477002.0],
                   [584003.0, 4477003.0], [np.nan, np.nan]])
    heading = np.array([0.0, 29.9, 0.0, 30.0, 359.0 + 360.0, 0.0])
    c = cosplace_classes(en, heading)
    assert c[0] == c[1] and len({c[0], c[2], c[3], c[4]}) == 4 and c[5] == -1
    capture = np.array([1, 2, 3, 4, 5, 6])
    assert class_pairs(c, capture).tolist() == [[0, 1]]
    assert class_pairs(c, np.array([1, 1, 3, 4, 5, 6])).tolist() == []  # one capture: no viewpoint pair
    big = cosplace_classes(np.zeros((50, 2)) + 5.0, np.zeros(50))
    assert class_pairs(big, max_per_class=10).shape == (45, 2)

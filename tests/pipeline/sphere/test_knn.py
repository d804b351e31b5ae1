"""The one blocked top-k search: brute-force agreement for any blocking, lower-row ties,
exclusion groups (self, capture), fewer eligible rows than k, angles, float64, streamed chunks."""

import numpy as np
import pytest
import torch

from geopipe.pipeline.sphere.knn import array_chunks, knn


def _brute(q, db, k, metric="ip", qg=None, dg=None):
    q64, d64 = np.asarray(q, np.float64), np.asarray(db, np.float64)
    s = q64 @ d64.T if metric == "ip" else 2 * q64 @ d64.T - (d64 ** 2).sum(1)
    if qg is not None:
        s = np.where(np.asarray(qg)[:, None] == np.asarray(dg)[None, :], -np.inf, s)
    order = np.lexsort((np.broadcast_to(np.arange(d64.shape[0]), s.shape), -s), axis=-1)[:, :k]
    idx = np.where(np.isfinite(np.take_along_axis(s, order, axis=1)), order, -1)
    return idx


def _unit(rng, n, d, dtype=np.float64):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("blocks", [dict(), dict(query_block=3, db_block=5), dict(db_block=7, block_bytes=64)])
def test_matches_brute_force_for_any_blocking(metric, blocks):
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 200, 16), _unit(rng, 30, 16)
    if metric == "l2":
        db = db * rng.uniform(0.5, 2.0, size=(200, 1))
    scores, idx = knn(q, db, 9, metric=metric, **blocks)
    np.testing.assert_array_equal(idx, _brute(q, db, 9, metric))
    assert scores.dtype == np.float64 and np.all(np.diff(scores, axis=1) <= 0)
    s = q @ db.T if metric == "ip" else 2 * q @ db.T - (db ** 2).sum(1)
    np.testing.assert_allclose(scores, np.take_along_axis(s, idx, axis=1), rtol=1e-12, atol=1e-12)


def test_ties_go_to_the_lower_database_row_whatever_the_blocking():
    # points on S² quantised to 8 directions: most scores tie, also across the k-th place
    rng = np.random.default_rng(1)
    dirs = _unit(rng, 8, 3)
    db = dirs[rng.integers(0, 8, 120)]
    q = dirs[rng.integers(0, 8, 25)]
    want = _brute(q, db, 11)
    for blocks in (dict(), dict(query_block=4, db_block=9), dict(db_block=1)):
        _, idx = knn(q, db, 11, **blocks)
        np.testing.assert_array_equal(idx, want)
    # identical copies of one point: the rows in ascending order
    _, idx = knn(np.array([[0.0, 0.0, 1.0]]), np.tile([[0.0, 0.0, 1.0]], (10, 1)), 4, db_block=3)
    assert idx.tolist() == [[0, 1, 2, 3]]


def test_a_query_never_retrieves_its_own_row_or_group():
    rng = np.random.default_rng(2)
    x = _unit(rng, 60, 8, np.float32)
    rows = np.arange(60)
    _, idx = knn(x, x, 5, query_groups=rows, db_groups=rows, db_block=7)
    assert not (idx == rows[:, None]).any()
    np.testing.assert_array_equal(idx, _brute(x, x, 5, qg=rows, dg=rows))
    capture = rows // 4  # four views per capture
    _, idx = knn(x, x, 5, query_groups=capture, db_groups=capture, db_block=13)
    assert not (capture[idx] == capture[:, None]).any()
    np.testing.assert_array_equal(idx, _brute(x, x, 5, qg=capture, dg=capture))
    # duplicates of the query in other groups are still found (only the group is excluded)
    dup = np.concatenate([x[:1], x[:1]])
    _, idx = knn(dup, dup, 1, query_groups=[0, 1], db_groups=[0, 1])
    assert idx.tolist() == [[1], [0]]


def test_fewer_eligible_rows_than_k():
    x = np.eye(3)
    scores, idx = knn(x, x, 4, query_groups=[0, 1, 2], db_groups=[0, 1, 2])
    assert (idx[:, 2:] == -1).all() and np.isneginf(scores[:, 2:]).all()
    assert idx[:, :2].tolist() == [[1, 2], [0, 2], [0, 1]]  # both scores are 0: the lower row first
    angles, idx = knn(x, x, 4, angles=True, query_groups=[0, 1, 2], db_groups=[0, 1, 2])
    np.testing.assert_allclose(angles[:, :2], np.pi / 2)
    assert np.isnan(angles[:, 2:]).all()


def test_angles_are_great_circle_distances():
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 50, 3), _unit(rng, 10, 3)
    ang, idx = knn(q, db, 3, angles=True)
    cos = np.clip(np.einsum("qd,qkd->qk", q, db[idx]), -1, 1)
    np.testing.assert_allclose(ang, np.arccos(cos), atol=1e-12)
    assert np.all(np.diff(ang, axis=1) >= 0)
    with pytest.raises(ValueError, match="metric='ip'"):
        knn(q, db, 3, metric="l2", angles=True)


def test_dtypes_and_streamed_chunks():
    rng = np.random.default_rng(4)
    db, q = _unit(rng, 40, 6, np.float16), _unit(rng, 5, 6, np.float32)
    scores, idx = knn(q, db, 3)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    streamed = knn(torch.as_tensor(q), array_chunks(db, 6), 3)
    np.testing.assert_array_equal(streamed[1], idx)
    np.testing.assert_allclose(streamed[0], scores, rtol=1e-6)  # float32 products of other block shapes
    with pytest.raises(ValueError, match="dimension"):
        knn(q, np.zeros((4, 5)), 1)
    with pytest.raises(ValueError, match="k must be"):
        knn(q, db, 0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_wide_chunks_take_the_group_prefilter_and_stay_exact(metric):
    # chunks of >= 4 (k + 1) groups of 64 columns search only the groups of largest maxima (and the
    # columns past the last whole group); float16 chunks are converted into a reused buffer. Both
    # must give the brute-force neighbours, with ties (8 directions) straddling the k-th place
    # and exclusion groups.
    rng = np.random.default_rng(6)
    dirs = _unit(rng, 8, 4)
    for db in (_unit(rng, 3000, 8), dirs[rng.integers(0, 8, 3000)]):
        if metric == "l2":
            db = db * rng.choice([0.5, 1.0, 2.0], size=(db.shape[0], 1))
        db = db.astype(np.float16).astype(np.float64)  # exact in float16 and float32
        q = db[rng.integers(0, db.shape[0], 40)]
        for k in (1, 3, 9):
            _, idx = knn(q.astype(np.float32), db.astype(np.float16), k, metric=metric, db_block=2900)
            np.testing.assert_array_equal(idx, _brute(q, db, k, metric))
        groups, qg = rng.integers(0, 50, db.shape[0]), rng.integers(0, 50, q.shape[0])
        _, idx = knn(q.astype(np.float32), db.astype(np.float32), 5, metric=metric, query_groups=qg, db_groups=groups)
        np.testing.assert_array_equal(idx, _brute(q, db, 5, metric, qg, groups))

"""Exact blocked top-K: brute force agreement, chunk independence, lower-index ties, exclusion
groups, and the faiss backend (skipped when faiss is not installed)."""

import numpy as np
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.index import faiss_available, faiss_gpus, faiss_on_gpu, faiss_topk, resolve_backend, search_topk
from geopipe.pipeline.retrieval.search import array_chunks, blocked_topk


def _brute(q, db, k, metric, qg=None, dg=None):
    q64, d64 = q.astype(np.float64), db.astype(np.float64)
    s = q64 @ d64.T if metric == "ip" else 2 * q64 @ d64.T - (d64 ** 2).sum(1)
    if qg is not None:
        s = np.where(qg[:, None] == dg[None, :], -np.inf, s)
    order = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), s.shape), -s), axis=-1)[:, :k]
    return order


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_matches_brute_force_for_any_chunking(metric, chunk):
    rng = np.random.default_rng(0)
    db, q = _unit(rng, 300, 16), _unit(rng, 40, 16)
    if metric == "l2":
        db = db * rng.uniform(0.5, 2.0, size=(300, 1)).astype(np.float32)
    res = blocked_topk(q, array_chunks(db, chunk), 10, metric)
    np.testing.assert_array_equal(res.indices, _brute(q, db, 10, metric))
    qd, dd = q.astype(np.float64), db.astype(np.float64)
    sq = ((qd[:, None, :] - dd[res.indices]) ** 2).sum(-1)
    np.testing.assert_allclose(res.distances, sq, atol=1e-5)


def test_ties_go_to_the_lower_database_index_across_chunks():
    db = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    for chunk in (1, 2, 4, 6):
        res = blocked_topk(q, array_chunks(db, chunk), 3)
        assert res.indices.tolist() == [[0, 2, 3], [1, 4, 0]], chunk


def test_spec_toy_ranking_with_tie():
    db = np.array([[1, 0], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    q = np.array([[0.1, 0.995], [-0.98, 0.2], [0.7, 0.7]], dtype=np.float32)
    res = blocked_topk(q, array_chunks(db, 2), 4, metric="l2")
    assert res.indices.tolist() == [[1, 3, 0, 2], [2, 1, 3, 0], [3, 0, 1, 2]]


def test_exclusion_groups_and_short_databases():
    rng = np.random.default_rng(1)
    db = _unit(rng, 12, 8)
    groups = np.arange(12) // 3  # captures of three records
    res = blocked_topk(db, array_chunks(db, 5), 12, query_groups=groups, db_groups=groups)
    np.testing.assert_array_equal(res.indices[:, :9], _brute(db, db, 9, "ip", groups, groups))
    assert (res.indices[:, 9:] == -1).all() and np.isnan(res.distances[:, 9:]).all()
    for qi in range(12):
        assert not set(res.indices[qi, :9].tolist()) & set(range(3 * (qi // 3), 3 * (qi // 3) + 3))


def test_dimension_mismatch_is_an_error():
    with pytest.raises(ValueError, match="dimension 4"):
        blocked_topk(np.zeros((2, 4), np.float32), array_chunks(np.zeros((3, 5), np.float32)), 1)


def test_backend_resolution():
    assert resolve_backend("blocked") == "blocked"
    with pytest.raises(GeopipeError, match="choose one of"):
        resolve_backend("annoy")
    if not faiss_available():
        assert resolve_backend("auto") == "blocked"
        with pytest.raises(GeopipeError, match=r"pip install 'geopipe-geolocation\[faiss\]'"):
            resolve_backend("faiss")


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed (pip install 'geopipe-geolocation[faiss]')")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_and_blocked_agree(metric):
    rng = np.random.default_rng(2)
    db, q = _unit(rng, 500, 32), _unit(rng, 50, 32)
    db[100] = db[7]  # an exact tie
    groups = np.arange(500) // 5
    qg = rng.integers(0, 100, size=50)
    a = blocked_topk(q, array_chunks(db, 64), 10, metric, qg, groups)
    b = faiss_topk(q, array_chunks(db, 64), 10, metric, qg, groups)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-4)
    c = search_topk(q, array_chunks(db, 64), 10, metric, backend="auto", query_groups=qg, db_groups=groups)
    np.testing.assert_array_equal(a.indices, c.indices)


def test_faiss_stays_on_the_cpu_without_gpu_support():
    assert not faiss_on_gpu("cpu")
    if faiss_gpus() == 0:  # no faiss, or a CPU-only build: never the GPU branch, whatever the device
        assert not faiss_on_gpu("auto")


@pytest.mark.skipif(faiss_gpus() == 0, reason="faiss without GPU support (pip install faiss-gpu-cu12 on a CUDA machine)")
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_gpu_and_blocked_agree(metric):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    assert faiss_on_gpu("cuda")
    rng = np.random.default_rng(3)
    db, q = _unit(rng, 2000, 64), _unit(rng, 100, 64)
    groups = np.arange(2000) // 4
    qg = rng.integers(0, 500, size=100)
    a = blocked_topk(q, array_chunks(db, 256), 10, metric, qg, groups)
    b = faiss_topk(q, array_chunks(db, 256), 10, metric, qg, groups, device="cuda")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.distances, b.distances, atol=1e-4)

"""Spherical k-means: recovers planted clusters, is deterministic, never leaves a cluster empty,
and streams a store chunk by chunk with the same answer as an in-memory array."""

import numpy as np
import pytest
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.inspection.kmeans import array_source, spherical_kmeans, store_source
from geopipe.pipeline.store.reader import open_store


def _planted(k=6, per=50, dim=32, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    truth = np.repeat(np.arange(k), per)
    return centres[truth] / np.linalg.norm(centres[truth], axis=1, keepdims=True) + noise * rng.normal(size=(k * per, dim)), truth


def _purity(found, truth):
    """Both ways: every found cluster is one planted cluster and every planted cluster one found cluster."""
    table = np.zeros((found.max() + 1, truth.max() + 1))
    np.add.at(table, (found, truth), 1)
    return min(table.max(axis=1).sum(), table.max(axis=0).sum()) / truth.size


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_recovers_planted_clusters_and_is_deterministic(init):
    x, truth = _planted()
    a = spherical_kmeans(array_source(x, chunk_rows=64), 6, init=init, seed=3)
    b = spherical_kmeans(array_source(x, chunk_rows=1000), 6, init=init, seed=3)
    assert _purity(a.labels, truth) == pytest.approx(1.0, abs=0.02 if init == "random" else 0.0)
    assert np.array_equal(a.labels, b.labels) and np.allclose(a.centroids, b.centroids, atol=1e-6)
    assert np.allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    assert a.sizes.sum() == truth.size and a.mean_cos > 0.9 and a.converged
    # the final cosine is each row's cosine to its own centroid
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(a.cos, np.einsum("nd,nd->n", xn, a.centroids[a.labels]), atol=1e-5)


def test_never_empty_even_with_duplicates_and_too_many_clusters():
    x, _ = _planted(k=3, per=20)
    res = spherical_kmeans(array_source(x), 40, init="random", seed=0)
    assert res.sizes.min() >= 1 and res.sizes.sum() == 60
    dup = spherical_kmeans(array_source(np.ones((10, 4))), 5)
    assert dup.sizes.min() >= 1 and dup.sizes.sum() == 10
    with pytest.raises(GeopipeError, match="only 10 records"):
        spherical_kmeans(array_source(np.ones((10, 4))), 11)
    with pytest.raises(GeopipeError, match="unknown init"):
        spherical_kmeans(array_source(x), 2, init="kmeans")


def test_store_source_streams_like_an_array(tmp_path):
    path = str(tmp_path / "s.zarr")
    views = write_synthetic_store(path, SyntheticConfig(n_places=30, views_per_place=3, dim=8, noise_min=0.05, noise_span=0.0))
    st = open_store(path)
    a = spherical_kmeans(store_source(st, chunk_rows=16), 30, seed=1)
    b = spherical_kmeans(array_source(st.embeddings[:]), 30, seed=1)
    assert np.array_equal(a.labels, b.labels)
    assert _purity(a.labels, np.asarray(views["place"])) > 0.95

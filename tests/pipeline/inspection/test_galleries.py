"""Galleries equal brute-force cosine top-k, never return the probe itself, and place probes
built from centroids and directions."""

import numpy as np
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.inspection.galleries import centroid_probes, concat_probes, direction_probes, record_probes, search_gallery
from geopipe.pipeline.sphere.knn import array_chunks


@pytest.fixture(scope="module")
def db():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)) * rng.uniform(0.5, 2.0, size=(300, 1))  # not unit: normalised inside
    latlon = np.stack([rng.uniform(40, 41, 300), rng.uniform(7, 8, 300)], axis=1)
    return x, latlon


def test_gallery_equals_brute_force_and_skips_the_probe(db):
    x, latlon = db
    rows = np.array([3, 50, 299])
    probes = record_probes(x[rows], rows, [f"k{r}" for r in rows], latlon[rows])
    gal = search_gallery(probes, array_chunks(x, 64), latlon, k=5, same_store=True, radius_m=30_000.0)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn[rows] @ xn.T
    sims[np.arange(3), rows] = -np.inf
    expect = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    assert np.array_equal(gal.indices, expect)
    assert np.allclose(gal.similarity, np.take_along_axis(sims, expect, axis=1), atol=1e-5)
    assert np.allclose(gal.latlon, latlon[expect]) and (gal.distance_km < 150).all()
    assert ((gal.nn_geo_consistency >= 0) & (gal.nn_geo_consistency <= 1)).all()
    other = search_gallery(probes, array_chunks(x, 64), latlon, k=1)  # another store: the record itself comes first
    assert other.indices[:, 0].tolist() == rows.tolist() and np.allclose(other.similarity[:, 0], 1.0, atol=1e-5)


def test_centroid_and_direction_probes(db):
    x, latlon = db
    base = record_probes(x[:2], [0, 1], ["a", "b"], latlon[:2])
    w = np.zeros(16)
    w[0] = 1.0
    d = direction_probes(base, w, [0.0, 1e4], name="e0")
    assert len(d) == 4 and d.label[1] == "a + 10000·e0" and np.allclose(d.vectors[1], w, atol=1e-3)
    assert np.allclose(d.vectors[0], base.vectors[0]) and d.row.tolist() == [0, 0, 1, 1]
    c = centroid_probes(x[:3], np.full((3, 2), np.nan))
    allp = concat_probes(base, c, d)
    gal = search_gallery(allp, array_chunks(x, 100), latlon, k=3, same_store=True)
    assert len(allp) == 9 and np.isnan(gal.frac_within_radius[2:5]).all() and np.isnan(gal.distance_km[2]).all()
    assert gal.indices[2, 0] == 0  # a centroid probe is no record: its own row may come first
    with pytest.raises(GeopipeError, match="components"):
        direction_probes(base, np.ones(3), [1.0])

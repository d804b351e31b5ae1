"""Places: locations chained by short links (the near-duplicate rule of splits and training).

Two records are at the same *place* when a chain of records, each within ``link_km`` of the
next, joins them (single linkage; connected components of the "closer than link_km" graph). The
geoclip world splits by place (a place goes whole to one split), and the hybrid method's training
never gives a record a neighbour of its own place, so that training matches a new photo.
"""

from __future__ import annotations

import math

import numpy as np

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM

__all__ = ["place_ids"]


def place_ids(xyz: np.ndarray, link_km: float) -> np.ndarray:
    """(N,) int64 place ids of unit vectors xyz (N, 3): equal ids are chained by links < ``link_km``
    (every point its own place when link_km ≤ 0). k-d tree pairs + connected components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    xyz = np.asarray(xyz, dtype=np.float64)
    n = xyz.shape[0]
    if link_km <= 0 or n == 0:
        return np.arange(n, dtype=np.int64)
    pairs = cKDTree(xyz).query_pairs(2 * math.sin(link_km / EARTH_RADIUS_KM / 2), output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)

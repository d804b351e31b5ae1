"""Nearest-neighbour galleries: for probe embeddings, the top-k database records with their
similarity and where they are.

A probe is a unit vector with an optional location: a real record (its embedding and
position), a k-means centroid (at its cluster's spherical mean location), or a point on a
direction, ``(e + t·w) / ‖e + t·w‖`` for a base probe e, a unit direction w (a linear probe's
weights, :mod:`geopipe.pipeline.inspection.probes`) and a step t (keeping the base's
location). The search is retrieval's exact blocked top-K
(:func:`geopipe.pipeline.retrieval.search.blocked_topk`, inner product of unit vectors =
cosine), so a gallery equals brute force, ties going to the lower database row. A record
probe searched in its own store never retrieves itself.

Per probe: ``nn_geo_consistency`` is the fraction of the top-k within ``radius_m`` of the
top-1 (1 − the ``u_geo_inconsistency`` retrieval score of
:mod:`geopipe.pipeline.uncertainty.scores`); ``frac_within_radius`` is the fraction within
``radius_m`` of the probe's own location (NaN when it has none).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.inspection.kmeans import normalise_rows
from geopipe.pipeline.retrieval.search import blocked_topk
from geopipe.pipeline.sphere.geometry import haversine_km
from geopipe.pipeline.uncertainty.scores import retrieval_scores

__all__ = ["PROBE_KINDS", "ProbeSet", "Gallery", "record_probes", "centroid_probes", "direction_probes", "concat_probes", "search_gallery"]

PROBE_KINDS = ("record", "centroid", "direction")


@dataclass(frozen=True)
class ProbeSet:
    """P probes. vectors: (P, D) float32 unit; kind: (P,) object (:data:`PROBE_KINDS`);
    label: (P,) object (the record key, ``"cluster 3"``, ``"<key> + 0.5·<direction>"``);
    latlon: (P, 2) float64 degrees, NaN when unknown; row: (P,) int64 store row of a record
    probe (and of the base record of a direction probe), −1 otherwise."""

    vectors: np.ndarray
    kind: np.ndarray
    label: np.ndarray
    latlon: np.ndarray
    row: np.ndarray

    def __len__(self) -> int:
        return self.vectors.shape[0]


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def record_probes(embeddings, rows, keys, latlon) -> ProbeSet:
    """Probes from records: (P, D) embeddings, (P,) store rows, (P,) keys, (P, 2) degrees."""
    n = len(keys)
    return ProbeSet(vectors=normalise_rows(embeddings), kind=_objects(["record"] * n), label=_objects([str(k) for k in keys]),
                    latlon=np.asarray(latlon, dtype=np.float64).reshape(n, 2), row=np.asarray(rows, dtype=np.int64))


def centroid_probes(centroids, latlon) -> ProbeSet:
    """Probes from (K, D) k-means centroids placed at (K, 2) degree locations (NaN allowed)."""
    k = len(centroids)
    return ProbeSet(vectors=normalise_rows(centroids), kind=_objects(["centroid"] * k), label=_objects([f"cluster {j}" for j in range(k)]),
                    latlon=np.asarray(latlon, dtype=np.float64).reshape(k, 2), row=np.full(k, -1, dtype=np.int64))


def direction_probes(base: ProbeSet, direction, steps, name: str = "w") -> ProbeSet:
    """For each base probe e and step t: (e + t·w)/‖e + t·w‖ with w = ``direction`` (D,)
    normalised; base-major order; each keeps its base's location and row."""
    w = np.asarray(direction, dtype=np.float64).reshape(-1)
    if w.size != base.vectors.shape[1] or not np.linalg.norm(w) > 0:
        raise GeopipeError(f"direction {name!r} has {w.size} components (norm {np.linalg.norm(w):.3g}); probes have {base.vectors.shape[1]}")
    w = w / np.linalg.norm(w)
    ts = [float(t) for t in steps]
    vec = [base.vectors[i].astype(np.float64) + t * w for i in range(len(base)) for t in ts]
    labels = [f"{base.label[i]} {'+' if t >= 0 else '-'} {abs(t):g}·{name}" for i in range(len(base)) for t in ts]
    rep = np.repeat(np.arange(len(base)), len(ts))
    return ProbeSet(vectors=normalise_rows(np.array(vec).reshape(len(vec), -1)), kind=_objects(["direction"] * len(vec)),
                    label=_objects(labels), latlon=base.latlon[rep], row=base.row[rep])


def concat_probes(*parts: ProbeSet) -> ProbeSet:
    """One probe set from several, in order."""
    return ProbeSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("vectors", "kind", "label", "latlon", "row")))


@dataclass(frozen=True)
class Gallery:
    """indices: (P, k) int64 database rows, best first (−1 where fewer were eligible);
    similarity: (P, k) float64 cosines; latlon: (P, k, 2) degrees of the neighbours;
    distance_km: (P, k) great-circle km from the probe's location (NaN when unknown);
    nn_geo_consistency, frac_within_radius: (P,) float64 (module docstring)."""

    indices: np.ndarray
    similarity: np.ndarray
    latlon: np.ndarray
    distance_km: np.ndarray
    nn_geo_consistency: np.ndarray
    frac_within_radius: np.ndarray


def search_gallery(probes: ProbeSet, chunks: Iterable[tuple[np.ndarray, np.ndarray]], db_latlon: np.ndarray, k: int = 8, *,
                   same_store: bool = False, radius_m: float = 25.0) -> Gallery:
    """The top-``k`` database records of every probe.

    chunks: (row ids ascending, (C, D) embeddings) of the database (normalised here, chunk by
    chunk); db_latlon: (N, 2) degrees indexed by row id; same_store: the probes' ``row``
    values are rows of this database, so a record never retrieves itself.
    """
    groups = {}
    if same_store:
        groups = {"query_groups": probes.row, "db_groups": np.arange(db_latlon.shape[0], dtype=np.int64)}
    top = blocked_topk(probes.vectors, ((ids, normalise_rows(rows)) for ids, rows in chunks), k, "ip", **groups)
    valid = top.indices >= 0
    ll = np.asarray(db_latlon, dtype=np.float64)[np.clip(top.indices, 0, None)]
    ll[~valid] = np.nan
    sim = np.where(valid, 1.0 - top.distances / 2.0, np.nan)
    dist = haversine_km(probes.latlon[:, None, 0], probes.latlon[:, None, 1], ll[..., 0], ll[..., 1])
    consistency = 1.0 - retrieval_scores(top.distances, top.indices, ll, radius_m=radius_m)["u_geo_inconsistency"]
    has_loc = np.isfinite(probes.latlon).all(axis=1)
    within = ((dist <= radius_m / 1000.0) & valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return Gallery(indices=top.indices, similarity=sim, latlon=ll, distance_km=dist, nn_geo_consistency=consistency,
                   frac_within_radius=np.where(has_loc & valid.any(axis=1), within, np.nan))

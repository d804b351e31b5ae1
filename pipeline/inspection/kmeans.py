"""Seeded spherical k-means on L2-normalised embeddings, streaming the rows chunk by chunk.

Every row is normalised to unit length (a zero row stays zero); a cluster's centroid is the
normalised mean of its members (the spherical mean direction), and a row belongs to the
centroid with the largest cosine. The assignment is the project's one blocked top-k
(:func:`geopipe.pipeline.sphere.knn.knn` with the centroids as the database, k = 1), so equal
cosines go to the lower centroid index.

Memory: one chunk of rows, the (K, D) float64 centroid sums, and (N,) labels and cosines —
never the (N, D) embeddings, so a store larger than memory is clustered in one pass per
iteration (plus one pass for the initial sample and one for the final cosines).

Initialisation: greedy k-means++ (D² sampling with D = 1 − cos, best of 2 + ln k candidates) or ``"random"`` distinct rows, drawn
from a seeded sample of at most ``init_sample`` rows. A cluster left empty by an assignment
takes the row fitted worst by its own centroid (lowest cosine) among clusters that keep at
least one member, so no returned cluster is empty (N ≥ K is required). Iterations stop when
the labels repeat, when the mean cosine gains less than ``tol``, or after ``n_iter``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.sphere.knn import array_chunks, knn
from geopipe.pipeline.store.format import nonfinite_records

__all__ = ["INITS", "EmbeddingSource", "KMeansResult", "array_source", "store_source", "normalise_rows", "spherical_kmeans"]

INITS = ("k-means++", "random")


@dataclass(frozen=True)
class EmbeddingSource:
    """n rows of dimension dim, read again at every pass. chunks(): an iterator of (row ids
    (C,) int64 ascending, rows (C, D)); take(rows): the (R, D) rows of sorted row ids."""

    n: int
    dim: int
    chunks: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]
    take: Callable[[np.ndarray], np.ndarray]


def array_source(x, chunk_rows: int = 65536) -> EmbeddingSource:
    """An in-memory (N, D) array as an :class:`EmbeddingSource`."""
    x = np.asarray(x)
    return EmbeddingSource(n=x.shape[0], dim=x.shape[1], chunks=lambda: array_chunks(x, chunk_rows), take=lambda rows: x[rows])


def store_source(store, chunk_rows: int = 65536) -> EmbeddingSource:
    """The embeddings of an opened store (:class:`geopipe.pipeline.store.reader.EmbeddingStore`),
    read in whole stored chunks of about ``chunk_rows`` rows; a non-finite row (an older store
    written before the writer refused them) is a GeopipeError naming its record."""
    view = store.embeddings
    step = max(chunk_rows // store.chunk_rows, 1) * store.chunk_rows

    def checked(rows, block):
        bad = nonfinite_records(store.keys[rows], block)
        if bad:
            raise GeopipeError(f"store {store.path}: {bad}; the store is damaged: run `geopipe store verify {store.path}`")
        return block

    def chunks():
        for start in range(0, len(store), step):
            stop = min(len(store), start + step)
            yield np.arange(start, stop, dtype=np.int64), checked(slice(start, stop), view[start:stop])

    def take(rows):
        rows = np.asarray(rows)
        return checked(rows, view[rows])

    return EmbeddingSource(n=len(store), dim=store.embed_dim, chunks=chunks, take=take)


def normalise_rows(x) -> np.ndarray:
    """(C, D) rows → float32 unit rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass(frozen=True)
class KMeansResult:
    """centroids: (K, D) float32 unit vectors; labels: (N,) int32 cluster of each row (every
    cluster has ≥ 1 member); cos: (N,) float32 cosine of each row to its final centroid;
    sizes: (K,) int64; mean_cos: mean of ``cos``; n_iter: assignment passes run;
    converged: stopped by repeated labels or ``tol`` rather than by ``n_iter``;
    history: mean cosine to the assigning centroids after each pass."""

    centroids: np.ndarray
    labels: np.ndarray
    cos: np.ndarray
    sizes: np.ndarray
    mean_cos: float
    n_iter: int
    converged: bool
    history: tuple[float, ...]


def _init(source: EmbeddingSource, k: int, init: str, init_sample: int, rng: np.random.Generator) -> np.ndarray:
    """(k, D) float32 unit starting centroids from a seeded sample of rows."""
    m = min(source.n, max(int(init_sample), k))
    sample = normalise_rows(source.take(np.sort(rng.choice(source.n, size=m, replace=False))))
    if init == "random":
        return sample[rng.choice(m, size=k, replace=False)]
    # greedy k-means++: of 2 + ln k D²-sampled candidates keep the one lowering Σ(1 − cos) most
    trials = 2 + int(np.log(k))
    chosen = [int(rng.integers(m))]
    best = sample @ sample[chosen[0]]
    for _ in range(1, k):
        w = np.maximum(1.0 - best.astype(np.float64), 0.0)
        w[chosen] = 0.0
        if w.sum() <= 0:  # every sampled row coincides with a centre: any row not chosen yet
            w = np.ones(m)
            w[chosen] = 0.0
        cand = rng.choice(m, size=trials, p=w / w.sum())
        after = np.maximum(best[:, None], sample @ sample[cand].T)
        pick = int(np.argmax(after.sum(axis=0, dtype=np.float64)))
        chosen.append(int(cand[pick]))
        best = after[:, pick]
    return sample[chosen]


def _assign(source: EmbeddingSource, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One pass: labels (N,) int32, cosines (N,) float32 to the assigning centroid, member sums (K, D) float64."""
    labels = np.empty(source.n, dtype=np.int32)
    cos = np.empty(source.n, dtype=np.float32)
    sums = np.zeros(centroids.shape, dtype=np.float64)
    for ids, rows in source.chunks():
        x = normalise_rows(rows)
        s, i = knn(x, centroids, 1, metric="ip")
        labels[ids], cos[ids] = i[:, 0], s[:, 0]
        np.add.at(sums, i[:, 0], x.astype(np.float64))
    return labels, cos, sums


def _fill_empty(source: EmbeddingSource, labels: np.ndarray, cos: np.ndarray, sums: np.ndarray) -> int:
    """Give each empty cluster the worst-fitted row of a cluster with ≥ 2 members (in place);
    returns how many clusters were refilled."""
    k = sums.shape[0]
    counts = np.bincount(labels, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return 0
    moves = []
    for row in np.argsort(cos, kind="stable"):
        if len(moves) == empty.size:
            break
        if counts[labels[row]] > 1:
            counts[labels[row]] -= 1
            moves.append(int(row))
    rows = np.array(sorted(moves), dtype=np.int64)
    x = normalise_rows(source.take(rows)).astype(np.float64)
    for r, v, j in zip(rows, x, empty):
        sums[labels[r]] -= v
        sums[j] = v
        labels[r], cos[r] = j, 1.0
    return int(empty.size)


def _centroids(sums: np.ndarray, old: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.where(norm > 0, sums / np.where(norm > 0, norm, 1.0), old).astype(np.float32)


def _final_cos(source: EmbeddingSource, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    cos = np.empty(source.n, dtype=np.float32)
    for ids, rows in source.chunks():
        cos[ids] = np.einsum("cd,cd->c", normalise_rows(rows), centroids[labels[ids]])
    return cos


def spherical_kmeans(source: EmbeddingSource, k: int, *, n_iter: int = 20, tol: float = 1e-6, init: str = "k-means++",
                     init_sample: int = 20000, seed: int = 0, progress: bool = False) -> KMeansResult:
    """Cluster the rows of ``source`` into ``k`` non-empty clusters (see the module docstring).

    Deterministic for a given source, k and seed. ``progress`` prints the passes on stderr.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise GeopipeError(f"k-means: the number of clusters must be an integer >= 1, got {k!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise GeopipeError(f"k-means: n_iter must be an integer >= 1, got {n_iter!r}")
    if init not in INITS:
        raise GeopipeError(f"k-means: unknown init {init!r}; choose one of {list(INITS)}")
    if source.n < k:
        raise GeopipeError(f"k-means: {k} clusters asked for but only {source.n} records; ask for at most {source.n}")
    rng = np.random.default_rng(seed)
    centroids = _init(source, int(k), init, init_sample, rng)
    labels, history, converged = None, [], False
    with Progress(total=n_iter, desc="k-means", unit="iter", enabled=progress) as bar:
        for _ in range(n_iter):
            new, cos, sums = _assign(source, centroids)
            _fill_empty(source, new, cos, sums)
            history.append(float(cos.mean(dtype=np.float64)))
            same = labels is not None and np.array_equal(new, labels)
            labels, centroids = new, _centroids(sums, centroids)
            bar.set_postfix(mean_cos=f"{history[-1]:.4f}")
            bar.update(1)
            if same or (len(history) > 1 and history[-1] - history[-2] < tol):
                converged = True
                break
    cos = _final_cos(source, centroids, labels)
    return KMeansResult(centroids=centroids, labels=labels, cos=cos, sizes=np.bincount(labels, minlength=k).astype(np.int64),
                        mean_cos=float(cos.mean(dtype=np.float64)), n_iter=len(history), converged=converged, history=tuple(history))

"""Exact k-nearest neighbours by blocked matrix products — the project's one top-k search.

Used for KDE bandwidths (:mod:`geopipe.pipeline.viz.density_grid`) and embedding retrieval
(:mod:`geopipe.pipeline.retrieval.search`).

For unit vectors (points on S² as (N, 3) xyz, or L2-normalised embeddings in any dimension) the
inner product is the cosine of the great-circle angle between them, so "nearest" is "largest
q·d": no angles are formed while searching and the search is exact (no approximate index).

Memory is bounded whatever N and Q are: the database is read in chunks of rows (an in-memory
array is cut into ``db_block`` rows; a store can stream its own chunks), the queries in blocks
of at most ``query_block`` rows, and one score block (query rows × chunk rows) of at most
``block_bytes`` exists at a time (one reused buffer, as is the float32 copy of a float16
chunk), next to the running (Q, k) best. Work is O(Q·N·D); the top-k of a wide score block
looks only at the groups of 64 columns with the largest maxima (exact, see ``_candidates``).

Ties are broken by the lower database row, so results do not depend on the chunking.
A query never retrieves a database row of its own *group* (``query_groups`` / ``db_groups``):
pass the row numbers (``np.arange``) for both to exclude each point itself when queries and
database are the same set, or capture ids to exclude every view of the query's own capture.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["METRICS", "array_chunks", "knn"]

#: "ip": rank by the inner product q·d (cosine for unit vectors); "l2": rank by 2 q·d − ‖d‖²,
#: i.e. by ascending squared Euclidean distance ‖q − d‖² (for vectors that are not unit).
METRICS = ("ip", "l2")
_BLOCK_BYTES = 256 * 2**20
#: Columns per group of the top-k prefilter (:func:`_candidates`): 64 is fastest on (256, 65536)
#: float32 blocks with k = 64 (0.6x the time of a plain top-k).
_GROUP = 64


def array_chunks(database, chunk_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(row ids (C,) int64, rows (C, D)) pieces of an (N, D) array (numpy, torch, or anything
    sliceable such as a Zarr array), in row order."""
    n = database.shape[0]
    for start in range(0, n, max(1, int(chunk_rows))):
        stop = min(n, start + chunk_rows)
        yield np.arange(start, stop, dtype=np.int64), database[start:stop]


def _as_matrix(x, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous CPU tensor: float64 stays float64, anything else becomes float32."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x.detach().cpu()
    if dtype is None:
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    return t.to(dtype).contiguous()


class _Scratch:
    """Reused flat buffers (one per name, grown as needed): a fresh 64 MiB score block or
    converted chunk per step is a fresh mapping whose pages the kernel faults in and zeroes
    every time, and the next one would be made while the last is still held."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(np.prod(shape))
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            self._bufs.pop(name, None)  # the old one goes before the new one comes
            buf = self._bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def _chunk_matrix(rows, dtype: torch.dtype, scratch: _Scratch) -> torch.Tensor:
    """A chunk as a contiguous ``dtype`` CPU tensor: the rows themselves when they already are
    one, else converted (exactly: float16 → float32) into a reused buffer."""
    t = torch.as_tensor(np.asarray(rows)) if not isinstance(rows, torch.Tensor) else rows.detach().cpu()
    if t.dtype == dtype and t.is_contiguous():
        return t
    out = scratch.take("chunk", tuple(t.shape), dtype)
    out.copy_(t)
    return out


def _candidates(s: torch.Tensor, places: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scores, their columns or None for all) of a (B, C) score block that hold its ``places``
    best scores: with at least ``4 * places`` whole groups of :data:`_GROUP` columns, only the
    ``places`` groups of largest maxima and the columns past the last whole group (a cheap
    max pass and a top-k of a quarter or less of the block instead of a top-k of all of it).
    Exact: ``places`` groups have maxima >= the ``places``-th largest maximum m, so the
    ``places``-th best candidate is >= m >= every column left out."""
    b, c = s.shape
    g = c // _GROUP
    if g < 4 * places:
        return s, None
    maxima = s[:, :g * _GROUP].unflatten(1, (g, _GROUP)).amax(dim=2)
    groups = torch.topk(maxima, places, dim=1, sorted=False).indices
    cols = (groups[:, :, None] * _GROUP + torch.arange(_GROUP)).flatten(1)
    if g * _GROUP < c:
        cols = torch.cat([cols, torch.arange(g * _GROUP, c).expand(b, -1)], dim=1)
    return torch.gather(s, 1, cols), cols


def _block_topk(s: torch.Tensor, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a (B, C) score block, best first, with the lower id first among equal scores
    (exactly, also when a tie straddles the k-th place)."""
    kk = min(k, s.shape[1])
    # one extra place instead of a pass over the block: the k-th score is tied with a row left
    # out iff the (k+1)-th equals it (a column not among the candidates is <= the (k+1)-th)
    cand, cols = _candidates(s, min(kk + 1, s.shape[1]))
    v, i = torch.topk(cand, min(kk + 1, s.shape[1]), dim=1)
    if cols is not None:
        i = torch.gather(cols, 1, i)
    if v.shape[1] > kk:
        ambiguous = (v[:, kk] == v[:, kk - 1]) & torch.isfinite(v[:, kk - 1])
        v, i = v[:, :kk], i[:, :kk]
    else:
        ambiguous = torch.zeros(v.shape[0], dtype=torch.bool)
    vals, idx = v.numpy().copy(), ids[i.numpy()]
    for r in torch.nonzero(ambiguous).flatten().tolist():  # rare: more rows share the k-th score
        row = s[r].numpy()
        order = np.lexsort((ids, -row))[:kk]
        vals[r], idx[r] = row[order], ids[order]
    return vals, idx


def _search_chunk(q: torch.Tensor, d: torch.Tensor, ids: np.ndarray, k: int, step: int, metric: str, qg, dg,
                  best_s: np.ndarray, best_i: np.ndarray, scratch: _Scratch) -> None:
    """Merge one database chunk ``d`` (C, D) with row ids ``ids`` into the running best
    (``best_s``, ``best_i``) (Q, k), ``step`` query rows at a time into one reused score block."""
    dn = (d * d).sum(dim=1) if metric == "l2" else None
    for a in range(0, q.shape[0], step):
        b = min(q.shape[0], a + step)
        s = torch.matmul(q[a:b], d.T, out=scratch.take("scores", (b - a, d.shape[0]), q.dtype))
        if dn is not None:
            s.mul_(2.0).sub_(dn)
        if qg is not None:
            s.masked_fill_(qg[a:b, None] == dg[None, :], -np.inf)
        vals, idx = _block_topk(s, ids, k)
        cand_s = np.concatenate([best_s[a:b], vals], axis=1)
        cand_i = np.concatenate([best_i[a:b], idx], axis=1)
        order = np.lexsort((np.where(cand_i < 0, np.iinfo(np.int64).max, cand_i), -cand_s), axis=-1)[:, :k]
        best_s[a:b] = np.take_along_axis(cand_s, order, axis=1)
        best_i[a:b] = np.take_along_axis(cand_i, order, axis=1)


def knn(queries, database, k: int, *, metric: str = "ip", angles: bool = False,
        query_groups=None, db_groups=None, query_block: int = 4096, db_block: int = 65536,
        block_bytes: int = _BLOCK_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest database rows of each query, exactly, in bounded memory.

    queries: (Q, D) array or tensor. float64 input is searched in float64 (exact comparisons,
        e.g. PRDC on S²); anything else in float32.
    database: an (N, D) array/tensor/Zarr array, or an iterable of (row ids (C,) int64,
        rows (C, D)) chunks with ids ascending across the stream (e.g. a store read chunk by
        chunk); each chunk is read once.
    k: neighbours per query (≥ 1).
    metric: ``"ip"`` (inner product; unit vectors: cosine) or ``"l2"`` (see :data:`METRICS`).
    angles: return great-circle angles in radians, arccos(clip(q·d, −1, 1)), instead of
        scores (``metric="ip"`` on unit vectors only).
    query_groups (Q,), db_groups (N,): integer group ids; a query never gets a database row of
        its own group (``db_groups`` is indexed by row id). Both or neither.
    query_block, db_block, block_bytes: query rows per block, rows per chunk of an in-memory
        database, and the largest score block in bytes.

    Returns ``(values, indices)``, both (Q, k), best first: ``values`` are scores (ip: q·d;
    l2: 2 q·d − ‖d‖², so ‖q − d‖² = ‖q‖² − score), float32 or float64 as searched, or
    angles (float64 radians); ``indices`` are int64 database rows. Among equal scores the lower
    row comes first. Where fewer than k rows are eligible the missing places hold index −1
    and value −inf (scores) or NaN (angles).
    """
    if metric not in METRICS:
        raise ValueError(f"knn: unknown metric {metric!r}; choose one of {list(METRICS)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"knn: k must be an integer >= 1, got {k!r}")
    if angles and metric != "ip":
        raise ValueError("knn: angles are great-circle angles between unit vectors; use metric='ip'")
    if (query_groups is None) != (db_groups is None):
        raise ValueError("knn: give both query_groups and db_groups, or neither")
    q = _as_matrix(queries)
    if q.ndim != 2:
        raise ValueError(f"knn: queries must be (Q, D), got shape {tuple(q.shape)}")
    nq, dim = q.shape
    k = int(k)
    best_s = np.full((nq, k), -np.inf, dtype=q.numpy().dtype)
    best_i = np.full((nq, k), -1, dtype=np.int64)
    qg = None if query_groups is None else torch.as_tensor(np.asarray(query_groups, dtype=np.int64))
    dg_all = None if db_groups is None else np.asarray(db_groups, dtype=np.int64)
    chunks = array_chunks(database, db_block) if hasattr(database, "shape") else database
    scratch = _Scratch()
    for ids, rows in chunks:
        ids = np.asarray(ids, dtype=np.int64)
        d = _chunk_matrix(rows, q.dtype, scratch)
        if d.shape[0] == 0:
            continue
        if d.ndim != 2 or d.shape[1] != dim:
            raise ValueError(f"knn: database chunk has shape {tuple(d.shape)}; queries have dimension {dim}")
        dg = None if dg_all is None else torch.as_tensor(dg_all[ids])
        step = max(1, min(int(query_block), int(block_bytes) // (d.element_size() * d.shape[0])))
        _search_chunk(q, d, ids, k, step, metric, qg, dg, best_s, best_i, scratch)
    best_i[~np.isfinite(best_s)] = -1
    if angles:
        s = best_s.astype(np.float64)
        return np.where(np.isfinite(s), np.arccos(np.clip(s, -1.0, 1.0)), np.nan), best_i
    return best_s, best_i

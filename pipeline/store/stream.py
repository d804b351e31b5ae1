"""Streaming training batches from an embedding store, through a bounded buffer.

The store is read in *windows* of ``buffer_chunks`` stored chunks: each epoch visits the
chunks in a seeded random order, a window's rows (the labelled ones ``select`` keeps: an
unlabelled record, latlon NaN, has no location to train on) are shuffled with a
seed of their own, and batches are consecutive runs of ``batch_size`` rows of the endless
sequence of shuffled windows (a batch may span two windows or two epochs). Batch ``i`` is
therefore a pure function of (store, seed, i): a resumed run seeks straight to its step and
continues the same stream, and the order differs from epoch to epoch.

A background thread reads and shuffles ahead, holding at most one window, the partial batch
carried over from the previous one and ``prefetch`` finished batches; :attr:`StoreStream.peak_bytes`
is that accounting's high-water mark. Works on local paths and fsspec urls (whatever
:func:`geopipe.pipeline.store.reader.open_store` opens).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.sphere.geometry import latlon_to_xyz
from geopipe.pipeline.store.format import labelled_rows, nonfinite_records
from geopipe.pipeline.store.reader import StoreError, open_store

__all__ = ["StoreScan", "scan_store", "StoreStream", "store_chunks", "read_rows"]

_STOP = object()


@dataclass(frozen=True)
class StoreScan:
    """One pass over a store's chunks (keys and embeddings), nothing kept but small results.

    counts: (n_chunks,) labelled rows of each chunk that ``select`` keeps; n: their total; sum,
    sumsq: (D,) float64 moments of those rows' embeddings (as stored); held_out: the first
    ``limit`` labelled rows ``select`` rejects, in row order, as (embeddings (m, D) store dtype,
    latlon (m, 2) degrees); unlabelled: rows without a location (latlon NaN), in neither.
    """

    counts: np.ndarray
    n: int
    sum: np.ndarray
    sumsq: np.ndarray
    held_out: tuple[np.ndarray, np.ndarray]
    unlabelled: int = 0


def _chunk_bounds(rows: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(rows, s + chunk)) for s in range(0, rows, chunk)]


def scan_store(path: str, select: Callable[[np.ndarray], np.ndarray] | None = None, *, held_out_limit: int = 0) -> StoreScan:
    """Count, sum and square-sum the labelled rows ``select(keys) -> bool mask`` keeps, chunk by
    chunk, and collect up to ``held_out_limit`` of the labelled rows it drops (a validation split)."""
    store = open_store(path)
    d = store.embed_dim
    counts, s, ss, n, unlabelled = [], np.zeros(d), np.zeros(d), 0, 0
    ho_c, ho_x, held = [], [], 0
    for a, b in _chunk_bounds(store.rows, store.chunk_rows):
        keep = np.ones(b - a, bool) if select is None else np.asarray(select(store.keys[a:b]), bool)
        emb, ll = store.embeddings[a:b], store.latlon[a:b]
        bad = nonfinite_records(store.keys[a:b], emb, ll)
        if bad:
            raise StoreError(f"store {path}: {bad}; the store is damaged: run `geopipe store verify {path}`")
        labelled = labelled_rows(ll)
        unlabelled += int((~labelled).sum())
        keep, drop = keep & labelled, ~keep & labelled
        block = emb[keep].astype(np.float64)
        s += block.sum(0)
        ss += (block * block).sum(0)
        counts.append(int(keep.sum()))
        n += counts[-1]
        if held < held_out_limit and drop.any():
            drop = np.flatnonzero(drop)[: held_out_limit - held]
            ho_c.append(emb[drop])
            ho_x.append(ll[drop])
            held += len(drop)
    dtype = np.dtype(store.attrs.get("dtype", "float32"))
    held_out = (np.concatenate(ho_c) if ho_c else np.zeros((0, d), dtype), np.concatenate(ho_x) if ho_x else np.zeros((0, 2)))
    return StoreScan(np.asarray(counts, np.int64), n, s, ss, held_out, unlabelled)


def _unit_vectors(latlon: np.ndarray) -> np.ndarray:
    """(m, 2) float64 degrees → (m, 3) float32 unit vectors, for a whole window at once (the
    same float64 maths as :func:`geopipe.pipeline.sphere.geometry.latlon_to_xyz`)."""
    return latlon_to_xyz(torch.from_numpy(np.ascontiguousarray(latlon, dtype=np.float64))).float().numpy()


class StoreStream:
    """Training batches streamed from a store: ``next_batch(generator) -> (x (B, 3) float32 unit
    vectors, cond (B, D) in the store's dtype)`` on ``device`` (the training loop's batch-source
    seam; the loop's generator is not used: the order comes from ``seed`` alone).

    path: store path or url; select: keys (n,) → bool mask of training rows (None: all; unlabelled
    rows, latlon NaN, are never served);
    buffer_chunks: stored chunks per shuffled window; prefetch: finished batches queued ahead;
    start_batch: index of the first batch to yield (a resumed run's step); counts: per-chunk
    selected row counts from :func:`scan_store` (scanned here when None).
    """

    def __init__(self, path: str, batch_size: int, *, seed: int, select: Callable | None = None, buffer_chunks: int = 4,
                 prefetch: int = 2, start_batch: int = 0, device: torch.device | str = "cpu", counts: np.ndarray | None = None):
        if batch_size < 1 or buffer_chunks < 1 or prefetch < 1:
            raise ValueError("batch_size, buffer_chunks and prefetch must be positive")
        self._store = open_store(path)
        self.batch_size, self.seed, self.buffer_chunks = int(batch_size), int(seed), int(buffer_chunks)
        self._select = select
        self._bounds = _chunk_bounds(self._store.rows, self._store.chunk_rows)
        self.counts = np.asarray(counts if counts is not None else scan_store(path, select).counts, np.int64)
        if len(self.counts) != len(self._bounds):
            raise ValueError(f"counts has {len(self.counts)} chunks, the store {len(self._bounds)}")
        self.n = int(self.counts.sum())
        if self.n == 0:
            raise ValueError(f"store {path} has no rows to train on")
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self.buffer_bytes = 0  # rows held by the reader thread: window + carry + queued batches
        self.peak_bytes = 0
        self.windows_read = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=int(prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(int(start_batch) * self.batch_size,), daemon=True,
                                        name="geopipe-store-stream")
        self._thread.start()

    # -- order -------------------------------------------------------------------------
    def epoch_windows(self, epoch: int) -> list[np.ndarray]:
        """The chunk indices of each window of ``epoch``, in visiting order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._bounds))
        return [order[i : i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]

    def _window_rows(self, epoch: int, w: int, chunks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(emb (m, D), latlon (m, 2)) of a window's selected rows, shuffled (seeded by epoch, window)."""
        embs, lls = [], []
        for c in chunks:
            a, b = self._bounds[int(c)]
            emb, ll = self._store.embeddings[a:b], self._store.latlon[a:b]
            keep = labelled_rows(ll)
            if self._select is not None:
                keep &= np.asarray(self._select(self._store.keys[a:b]), bool)
            if not keep.all():
                emb, ll = emb[keep], ll[keep]
            embs.append(emb)
            lls.append(ll)
        emb, ll = np.concatenate(embs), np.concatenate(lls).astype(np.float64)
        perm = np.random.default_rng([self.seed, epoch, w]).permutation(len(emb))
        return emb[perm], _unit_vectors(ll[perm])

    # -- reader thread ---------------------------------------------------------------------
    def _account(self, delta: int) -> None:
        with self._lock:
            self.buffer_bytes += delta
            self.peak_bytes = max(self.peak_bytes, self.buffer_bytes)

    def _positions(self, skip_rows: int):
        """(epoch, window index, chunks, row offset) from the window holding row ``skip_rows`` on."""
        epoch, skip = divmod(skip_rows, self.n)
        while True:
            for w, chunks in enumerate(self.epoch_windows(epoch)):
                rows = int(self.counts[chunks].sum())
                if skip >= rows:  # skipped without reading
                    skip -= rows
                    continue
                yield epoch, w, chunks, skip
                skip = 0
            epoch += 1

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, skip_rows: int) -> None:
        try:
            carry_e, carry_l = None, None
            carry_bytes = 0
            for epoch, w, chunks, offset in self._positions(skip_rows):
                emb, ll = self._window_rows(epoch, w, chunks)
                self.windows_read += 1
                emb, ll = emb[offset:], ll[offset:]
                raw_bytes = emb.nbytes + ll.nbytes
                self._account(raw_bytes)
                if carry_e is not None and len(carry_e):
                    emb, ll = np.concatenate([carry_e, emb]), np.concatenate([carry_l, ll])
                window_bytes = emb.nbytes + ll.nbytes
                self._account(window_bytes - raw_bytes - carry_bytes)
                full = len(emb) // self.batch_size * self.batch_size
                for i in range(0, full, self.batch_size):
                    batch = self._tensors(emb[i : i + self.batch_size], ll[i : i + self.batch_size])
                    self._account(batch[2])
                    if not self._put(batch):
                        return
                carry_e, carry_l = emb[full:].copy(), ll[full:].copy()
                carry_bytes = carry_e.nbytes + carry_l.nbytes
                self._account(carry_bytes - window_bytes)
                del emb, ll
                if self._stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which raises it with its traceback
            self._put(exc)

    def _tensors(self, emb: np.ndarray, xyz: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(xyz))
        c = torch.from_numpy(np.ascontiguousarray(emb))
        if self._pin:  # page-locked host memory, so the copy to the GPU can overlap the step
            x, c = x.pin_memory(), c.pin_memory()
        return x, c, x.numel() * x.element_size() + c.numel() * c.element_size()

    # -- consumer ----------------------------------------------------------------------------
    def next_batch(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the store stream's reader thread stopped") from None
        if isinstance(item, BaseException):
            raise item
        x, c, nbytes = item
        self._account(-nbytes)
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), c.to(self.device, non_blocking=non_blocking)

    def close(self) -> None:
        """Stop the reader thread (idempotent)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> StoreStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n


def store_chunks(store, rows: np.ndarray, chunk_rows: int):
    """(row ids (C,) int64, embeddings (C, D) as stored) of the selected ``rows`` (sorted) of an
    opened store, in store order: one read of whole stored chunks per ``chunk_rows`` rows
    (rounded to the store's chunking), so memory is one read whatever the store's size. A
    non-finite embedding (an older store) is a StoreError naming its record."""
    n = len(store)
    step = max(chunk_rows // store.chunk_rows, 1) * store.chunk_rows
    keep = np.zeros(n, dtype=bool)
    keep[rows] = True
    for start in range(0, n, step):
        stop = min(n, start + step)
        sel = keep[start:stop]
        if sel.all():  # the whole read, without a copy
            ids = np.arange(start, stop, dtype=np.int64)
            yield ids, _finite(store, ids, store.embeddings[start:stop])
        elif sel.any():
            ids = np.arange(start, stop, dtype=np.int64)[sel]
            yield ids, _finite(store, ids, store.embeddings[start:stop][sel])


def read_rows(store, rows: np.ndarray) -> np.ndarray:
    """Embeddings (R, D) as stored of the store rows ``rows`` (R,) (an empty (0, D) float32 for
    none); a non-finite one is a StoreError naming its record."""
    rows = np.asarray(rows, dtype=np.int64)
    if not rows.size:
        return np.zeros((0, store.embed_dim), np.float32)
    if rows[0] >= 0 and rows[-1] - rows[0] + 1 == rows.size and (np.diff(rows) == 1).all():  # a run: a slice reads faster
        return _finite(store, rows, store.embeddings[int(rows[0]):int(rows[-1]) + 1])
    return _finite(store, rows, store.embeddings[rows])


def _all_finite(emb: np.ndarray) -> bool:
    """No NaN or infinity in ``emb``; float16 by its bits (exponent all ones), 4,096 rows at a
    time (numpy's float16 isfinite converts every value and is 5x slower)."""
    if emb.dtype != np.float16 or emb.ndim != 2 or not emb.flags.c_contiguous:
        with np.errstate(invalid="ignore"):
            return bool(np.isfinite(emb).all())
    bits = emb.view(np.uint16)
    return all(int((bits[a:a + 4096] & 0x7FFF).max(initial=0)) < 0x7C00 for a in range(0, bits.shape[0], 4096))


def _finite(store, rows: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """``emb`` (the embeddings of store rows ``rows``), or StoreError naming the first non-finite record."""
    ok = _all_finite(emb)
    if not ok:
        bad = nonfinite_records(np.asarray(store.keys[rows]), emb)
        raise StoreError(f"store {store.path}: {bad}; the store is damaged: run `geopipe store verify {store.path}`")
    return emb

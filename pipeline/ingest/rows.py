"""One shard's decoded rows → the rows a store keeps, plus rejects, appended in one commit.

Shared by extraction (rows from images or embedded ``.npy`` entries) and import (rows from
embedding/metadata file pairs): rows whose embedding is unusable become ``invalid_embedding``
rejects, repeated keys ``duplicate_key`` rejects (the first occurrence in the store or the
shard is kept), and every reject is ordered by its sample index within the shard.

Import reads its pairs through row sources that hold a block of rows, not the file:
:class:`NpyRows` (embeddings) and :class:`ParquetRows` (metadata, a record batch at a time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.format import ShardStat, usable_embeddings
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["PairError", "NpyRows", "ParquetRows", "ShardRows", "commit_rows"]


class PairError(GeopipeError):
    """A pair that cannot be imported at all (missing partner, misaligned rows, missing column)."""


class NpyRows:
    """The rows of an (N, D) ``.npy`` file (local or fsspec url), read from the file a slice at a
    time: ``x[a:b]`` reads rows [a, b) (of ``index`` when given: the kept rows) and returns them
    as numpy in the file's dtype; the array is never loaded whole. ``peak_rows``: the most rows
    one read returned (shared by :meth:`select` views), so a caller can check its reads stay
    bounded by a few store chunks."""

    def __init__(self, url: str, index: np.ndarray | None = None, _header: tuple | None = None, _stats: list | None = None):
        self.url = url
        if _header is None:
            try:
                with fsio.open_read(url) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:
                        raise ValueError(f".npy format version {version} (1.0 and 2.0 are read)")
                    shape, fortran, dtype = read_header(fh)
                    _header = (tuple(shape), fortran, np.dtype(dtype), fh.tell())
            except (ValueError, OSError, EOFError) as exc:
                raise PairError(f"{url}: not a readable .npy array ({' '.join(str(exc).split())[:200]})") from None
        self._header, self._stats, self.index = _header, _stats if _stats is not None else [0], index
        shape, fortran, self.dtype, _ = _header
        if len(shape) == 2 and (fortran or self.dtype.hasobject):
            raise PairError(f"{url}: a Fortran-ordered or object .npy cannot be imported; save it with np.save(path, np.ascontiguousarray(x))")
        self.shape = shape if index is None else (len(index), *shape[1:])
        self.ndim = len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def peak_rows(self) -> int:
        return self._stats[0]

    def select(self, index) -> NpyRows:
        """A view of the rows ``index`` (ascending row numbers of this view)."""
        index = np.asarray(index, dtype=np.int64)
        return NpyRows(self.url, index if self.index is None else self.index[index], self._header, self._stats)

    def _file_rows(self, start: int, stop: int) -> np.ndarray:
        _, _, dtype, offset = self._header
        per = int(np.prod(self._header[0][1:], dtype=np.int64))
        with fsio.open_read(self.url) as fh:
            fh.seek(offset + start * per * dtype.itemsize)
            data = fh.read((stop - start) * per * dtype.itemsize)
        if len(data) != (stop - start) * per * dtype.itemsize:
            raise PairError(f"{self.url}: the file is shorter than its .npy header says ({self.shape}); re-create it")
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, *self._header[0][1:])

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("NpyRows reads contiguous slices only")
        a, b, _ = item.indices(len(self))
        b = max(a, b)
        if self.index is None:
            out = self._file_rows(a, b)
        else:
            rows = self.index[a:b]
            out = self._file_rows(int(rows[0]), int(rows[-1]) + 1)[rows - rows[0]] if len(rows) else self._file_rows(0, 0)
        self._stats[0] = max(self._stats[0], len(out))
        return out


class ParquetRows:
    """The rows of a Parquet file (local or fsspec url), read a record batch at a time and never
    whole. ``schema`` (pyarrow) and ``num_rows`` come from the footer; ``peak_rows``: the most rows
    held at once by :meth:`batches` and the :meth:`rows` views, so a caller can check its reads
    stay bounded by a block."""

    def __init__(self, url: str):
        import pyarrow.parquet as pq

        self.url, self.peak_rows = url, 0
        try:
            self._file = pq.ParquetFile(url if fsio.is_local(url) else fsio.open_read(url))
        except (OSError, ValueError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            raise PairError(f"{url}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
        self.schema, self.num_rows = self._file.schema_arrow, self._file.metadata.num_rows

    def batches(self, columns: list[str], rows: int):
        """Yield (first row, pyarrow Table of the next ``rows`` rows at most) of ``columns``, in file order."""
        import pyarrow as pa

        start = 0
        for batch in self._file.iter_batches(batch_size=rows, columns=list(dict.fromkeys(columns))):
            self.peak_rows = max(self.peak_rows, batch.num_rows)
            yield start, pa.Table.from_batches([batch])
            start += batch.num_rows

    def rows(self, index: np.ndarray, columns: list[str], convert, block: int) -> dict:
        """field → a lazy column of ``convert(column)`` values of the rows ``index`` (ascending):
        ``col[a:b]`` returns them as a list, reading the batches that hold rows ``index[a:b]`` once
        for every column (slices come in ascending order, each at most ``block`` rows)."""
        return _Rows(self, np.asarray(index, dtype=np.int64), list(columns), convert, block).columns


class _Rows:
    def __init__(self, source: ParquetRows, index: np.ndarray, columns: list[str], convert, block: int):
        self._source, self._index, self._convert = source, index, convert
        self._batches, self._held, self._done = source.batches(columns, block), [], None
        self.columns = {name: _Column(self, name) for name in columns}

    def values(self, name: str, a: int, b: int) -> list:
        import pyarrow as pa

        if self._done is None or self._done[0] != (a, b):
            rows = self._index[a:b]
            if not len(rows):
                return []
            self._held = [(s, t) for s, t in self._held if s + t.num_rows > rows[0]]  # drop batches before the block
            while not self._held or self._held[-1][0] + self._held[-1][1].num_rows <= rows[-1]:
                self._held.append(next(self._batches))
            self._source.peak_rows = max(self._source.peak_rows, sum(t.num_rows for _, t in self._held))
            table = pa.concat_tables([t for _, t in self._held]).take(pa.array(rows - self._held[0][0]))
            self._done = ((a, b), {n: self._convert(table.column(n)) for n in self.columns})
        return self._done[1][name]


class _Column:
    def __init__(self, rows: _Rows, name: str):
        self._rows, self._name = rows, name

    def __len__(self) -> int:
        return len(self._rows._index)

    def __getitem__(self, item: slice) -> list:
        a, b, _ = item.indices(len(self))
        return self._rows.values(self._name, a, max(a, b))


@dataclass
class ShardRows:
    """Candidate rows of one shard, in shard order.

    idx: (n,) sample index of each row within the shard; keys: (n,) str; latlon: (n, 2)
    degrees; meta: (n,) dicts field → JSON string; embeddings: (n, D) float raw embeddings (an
    array, or a row source with ``[a:b]`` slices and ``select(rows)``, read a few chunks at a time);
    rejects: [(sample index, Reject)] found while decoding.
    """

    idx: list[int]
    keys: list[str]
    latlon: list
    meta: list[dict]
    embeddings: np.ndarray  # or a row source read in slices (ingest.rows.NpyRows)
    rejects: list[tuple[int, Reject]] = field(default_factory=list)


def commit_rows(writer: StoreWriter, url: str, stat: ShardStat, rows: ShardRows) -> tuple[int, list[Reject]]:
    """Filter ``rows`` (unusable embeddings, duplicate keys) and append them as shard ``url``.

    Returns (rows kept, this shard's rejects in sample order).
    """
    attrs, per, n = writer.attrs, writer.block_rows, len(rows.keys)
    usable = np.concatenate([usable_embeddings(np.asarray(rows.embeddings[a:a + per]), attrs["dtype"], attrs["normalized"])
                             for a in range(0, n, per)] or [np.zeros(0, bool)])
    rejects, keep, seen = list(rows.rejects), [], set()
    for row, key in enumerate(rows.keys):
        if not usable[row]:
            detail = f"embedding is non-finite, zero or overflows {attrs['dtype']}"
            rejects.append((rows.idx[row], Reject(key, url, "invalid_embedding", detail)))
        elif key in writer.keys_seen or key in seen:
            where = "in the store" if key in writer.keys_seen else "earlier in this shard"
            rejects.append((rows.idx[row], Reject(key, url, "duplicate_key", f"key already {where}; first occurrence kept")))
        else:
            seen.add(key)
            keep.append(row)
    ordered = [r for _, r in sorted(rejects, key=lambda t: t[0])]
    fields = list(dict.fromkeys(name for row in keep for name in rows.meta[row]))
    columns = {name: [rows.meta[row].get(name, "") for row in keep] for name in fields}
    coords = np.asarray([rows.latlon[r] for r in keep], dtype=np.float64).reshape(-1, 2)
    if len(keep) == len(rows.embeddings):  # every row kept: no gather copy
        emb = rows.embeddings
    elif not keep:
        emb = np.zeros((0, attrs["embed_dim"]), np.float32)
    else:
        emb = rows.embeddings.select(keep) if hasattr(rows.embeddings, "select") else np.asarray(rows.embeddings)[keep]
    writer.append_shard(url, emb, coords, [rows.keys[r] for r in keep], columns, ordered, stat)
    return len(keep), ordered

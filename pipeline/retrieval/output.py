"""A predictions file written block by block, so its size never sits in memory.

Each block's columns become one row group of a hidden temporary Parquet file beside the output
(local paths) or in the temporary directory (fsspec URLs). :meth:`PredictionsStream.finish`
then writes the real file with the final key-value metadata — the ``geopipe`` record, whose
numbers (Recall@K, kernel) are known only at the end, and the GeoParquet ``bbox`` of all
predicted points — copying the row groups one at a time, and moves it into place atomically
(readers see the old file or the new one; a remote URL gets one upload). An error, or leaving
the ``with`` block without :meth:`finish`, removes the temporary files and leaves the output
untouched.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geopipe.pipeline.artifacts.predictions import wkb_points
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.predictions import PREDICTIONS_SCHEMA, geo_metadata

__all__ = ["block_table", "PredictionsStream"]


def _arrow(value, typ: pa.DataType, n: int) -> pa.Array:
    if value is None:
        return pa.nulls(n, type=typ)
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        return value.cast(typ)
    return pa.array(value, type=typ)


def block_table(columns: Mapping, n: int) -> pa.Table:
    """A :data:`PREDICTIONS_SCHEMA` table of ``n`` rows from numpy arrays, pyarrow arrays or
    lists (missing columns null; ``geometry`` from ``lat``/``lon`` when not given)."""
    cols = dict(columns)
    if cols.get("geometry") is None:
        cols["geometry"] = wkb_points(cols["lat"], cols["lon"])
    return pa.Table.from_arrays([_arrow(cols.get(f.name), f.type, n) for f in PREDICTIONS_SCHEMA], schema=PREDICTIONS_SCHEMA)


class PredictionsStream:
    """``with PredictionsStream(path) as out: out.write(columns, n) …; out.finish(metadata)``."""

    def __init__(self, path: str):
        self.path = fsio.normalize(path)
        local = fsio.is_local(self.path)
        if local and os.path.isdir(self.path):
            raise GeopipeError(f"output {self.path!r} is a directory; give a file path such as "
                               f"{os.path.join(self.path, 'predictions.parquet')!r}")
        where = os.path.dirname(os.path.abspath(self.path)) if local else tempfile.gettempdir()
        if local:
            os.makedirs(where, exist_ok=True)
        self._blocks = os.path.join(where, f".{os.path.basename(self.path)}.{uuid.uuid4().hex[:12]}.blocks.tmp")
        self._writer = pq.ParquetWriter(self._blocks, PREDICTIONS_SCHEMA)
        self._bbox = [np.inf, np.inf, -np.inf, -np.inf]  # min lon, min lat, max lon, max lat
        self.rows = 0

    def write(self, columns: Mapping, n: int) -> None:
        """Append ``n`` rows (columns as :func:`block_table` takes them) as one row group."""
        table = block_table(columns, n)
        self._writer.write_table(table)
        lat, lon = (np.asarray(columns[c], dtype=np.float64) for c in ("lat", "lon"))
        ok = np.isfinite(lat) & np.isfinite(lon)
        if ok.any():
            b = self._bbox
            self._bbox = [min(b[0], lon[ok].min()), min(b[1], lat[ok].min()), max(b[2], lon[ok].max()), max(b[3], lat[ok].max())]
        self.rows += n

    def _copy(self, dest: str, metadata: Mapping[bytes, bytes]) -> None:
        blocks = pq.ParquetFile(self._blocks)
        with pq.ParquetWriter(dest, PREDICTIONS_SCHEMA.with_metadata(dict(metadata))) as writer:
            for i in range(blocks.num_row_groups):
                writer.write_table(blocks.read_row_group(i))
            if blocks.num_row_groups == 0:
                writer.write_table(PREDICTIONS_SCHEMA.empty_table())

    def finish(self, metadata: Mapping[bytes, bytes]) -> None:
        """Write the output with ``metadata`` (its ``geo`` entry gets the bbox) and remove the temporaries."""
        self._writer.close()
        bbox = tuple(float(v) for v in self._bbox) if np.isfinite(self._bbox).all() else None
        meta = {**metadata, b"geo": json.dumps(geo_metadata(bbox)).encode()}
        try:
            if fsio.is_local(self.path):
                with fsio.atomic_path(self.path) as tmp:
                    self._copy(tmp, meta)
            else:
                final = self._blocks + ".final"
                try:
                    self._copy(final, meta)
                    fs, path = fsio.url_to_fs(self.path)
                    parent = path.rsplit("/", 1)[0]
                    if parent and parent != path:
                        fs.makedirs(parent, exist_ok=True)
                    fs.put_file(final, path)
                finally:
                    if os.path.exists(final):
                        os.unlink(final)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close and remove the temporary file (the output is left as it was)."""
        self._writer.close()  # a second close does nothing
        if os.path.exists(self._blocks):
            os.unlink(self._blocks)

    def __enter__(self) -> PredictionsStream:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

"""The predictions table (``schemas.predictions``): build, write atomically, read back.

One reader and one writer for every stage that emits or scores predictions (predict,
evaluate, and later retrieval), so the GeoParquet geometry and the ``geopipe`` key-value
metadata are encoded in one place.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID, geo_metadata

__all__ = ["wkb_points", "predictions_table", "predictions_metadata", "with_bbox", "write_predictions", "read_predictions",
           "NUMERIC_COLUMNS"]

_REQUIRED = ("key", "lat", "lon")
#: Float columns :func:`read_predictions` returns when present (as float64 arrays, NaN for null).
NUMERIC_COLUMNS = ("lat", "lon", "true_lat", "true_lon", "log_likelihood", "neg_entropy_nats", "hdr_rank")


def wkb_points(lat: np.ndarray, lon: np.ndarray) -> list[bytes]:
    """Little-endian WKB points in (lon, lat) order, degrees: one ``bytes`` per record."""
    head = b"\x01\x01\x00\x00\x00"
    xy = np.stack([np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)], axis=1).astype("<f8")
    return [head + row.tobytes() for row in xy]


def predictions_table(columns: Mapping[str, Sequence | np.ndarray | None], n: int) -> pa.Table:
    """A table of :data:`PREDICTIONS_SCHEMA` from column values (missing columns are null);
    ``geometry`` is filled from ``lat``/``lon`` when not given."""
    cols = dict(columns)
    if cols.get("geometry") is None:
        cols["geometry"] = wkb_points(cols["lat"], cols["lon"])
    arrays = []
    for f in PREDICTIONS_SCHEMA:
        value = cols.get(f.name)
        arrays.append(pa.array(list(value) if value is not None else [None] * n, type=f.type))
    return pa.Table.from_arrays(arrays, schema=PREDICTIONS_SCHEMA)


def predictions_metadata(config: Mapping, model: Mapping, provenance: Mapping) -> dict[bytes, bytes]:
    """Parquet key-value metadata: ``geopipe`` (schema, config, model identity, provenance) and
    GeoParquet ``geo``."""
    meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": dict(config), "model": dict(model), **provenance}
    return {METADATA_KEY: json.dumps(meta, default=str).encode(), b"geo": json.dumps(geo_metadata()).encode()}


def with_bbox(table: pa.Table, metadata: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """``metadata`` with the GeoParquet ``bbox`` of ``table``'s predicted points (degrees; none
    when no point is finite)."""
    lat, lon = (table.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in ("lat", "lon"))
    ok = np.isfinite(lat) & np.isfinite(lon)
    bbox = (lon[ok].min(), lat[ok].min(), lon[ok].max(), lat[ok].max()) if ok.any() else None
    return {**metadata, b"geo": json.dumps(geo_metadata(bbox)).encode()}


def write_predictions(table: pa.Table, path: str, metadata: Mapping[bytes, bytes]) -> None:
    """Write ``table`` with ``metadata`` to ``path`` atomically (old file or new, never half)."""
    if os.path.isdir(path):
        raise GeopipeError(f"output {path!r} is a directory; give a file path such as {os.path.join(path, 'predictions.parquet')!r}")
    table = table.replace_schema_metadata(with_bbox(table, metadata))
    with fsio.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_predictions(path: str) -> tuple[dict, dict]:
    """(columns, metadata) of a predictions file: ``key`` as a list of str, the
    :data:`NUMERIC_COLUMNS` present as float64 arrays. Raises GeopipeError for a missing,
    unreadable or foreign file."""
    if not os.path.isfile(path):
        raise GeopipeError(f"predictions file {path!r} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise GeopipeError(f"{path!r} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    missing = [c for c in _REQUIRED if c not in pf.schema_arrow.names]
    if raw is None or missing:
        why = f"missing columns {missing}" if missing else f"no {METADATA_KEY.decode()!r} metadata"
        raise GeopipeError(f"{path!r} is not a geopipe predictions file ({why}); write it with `geopipe predict`")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GeopipeError(f"{path!r}: the {METADATA_KEY.decode()!r} metadata is not valid JSON") from None
    if meta.get("schema", PREDICTIONS_SCHEMA_ID) != PREDICTIONS_SCHEMA_ID:
        raise GeopipeError(f"{path!r} has predictions schema {meta.get('schema')!r}; this geopipe reads {PREDICTIONS_SCHEMA_ID!r}")
    names = [c for c in ("key", *NUMERIC_COLUMNS) if c in pf.schema_arrow.names]
    table = pf.read(columns=names)
    cols: dict = {"key": [str(k) for k in table.column("key").to_pylist()]}
    for name in names[1:]:
        try:
            cols[name] = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowException:
            raise GeopipeError(f"{path!r}: column {name!r} is not numeric") from None
    return cols, meta

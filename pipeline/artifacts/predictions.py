"""The predictions table (``schemas.predictions``): build, write, read back.

One reader and one writer for every stage that emits or scores predictions (predict, locate,
retrieve, evaluate, BayesCap re-scoring), so the GeoParquet geometry, the ``geopipe`` key-value
metadata and the integrity checks are encoded in one place (streamed files:
:mod:`geopipe.pipeline.artifacts.outputs`; dataset parts: :mod:`geopipe.pipeline.artifacts.dataset`).

Predictions are one Parquet file, or a *dataset directory* written part by part (by Dask
workers): ``part-<start>-<stop>.parquet`` per row range [start, stop) of the store (12-digit
zero-padded, so name order is row order), each written atomically with the full metadata, then
``_common_metadata`` (schema and metadata) and ``_metadata`` (also every part's row groups and
SHA-256) written last by one process. pandas, pyarrow, duckdb (``dir/*.parquet``) and geopandas
read the directory as one table; :func:`read_predictions` reads exactly the parts ``_metadata``
lists, so a dataset without it (a run still going, or interrupted) is refused rather than read
half. Every page carries a CRC-32, verified as it is read, and each part of a dataset is checked
against its recorded SHA-256 before it is read: damage is a one-line error naming the file or
part, never other numbers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geopipe.pipeline.artifacts.geoparquet import point_covering, region_covering, with_bbox, wkb_points
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.predictions import METADATA_KEY, PARTS_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID, geo_metadata

__all__ = ["TRUTH_COLUMNS", "WRITE_OPTIONS", "conform", "write_table_file", "predictions_table", "predictions_metadata",
           "write_predictions", "read_predictions", "NUMERIC_COLUMNS", "part_name", "parse_part_name", "list_parts",
           "DATASET_METADATA", "file_digest", "dataset_listing", "read_columns", "replace_columns"]

_REQUIRED = ("key", "lat", "lon")
#: Float columns :func:`read_predictions` returns when present (as float64 arrays, NaN for null).
NUMERIC_COLUMNS = ("lat", "lon", "true_lat", "true_lon", "log_likelihood", "neg_entropy_nats", "hdr_rank")
#: Columns about the truth: null (not NaN) where a record has no known location (an unlabelled
#: record) or the quantity was not computed for it, so Parquet readers see a missing value (as
#: every optional float column: :func:`predictions_table` writes no NaN into any of them).
TRUTH_COLUMNS = ("true_lat", "true_lon", "distance_km", "log_likelihood", "hdr_rank")
#: The dataset's summary files, written last (their presence marks a complete dataset).
DATASET_METADATA = ("_common_metadata", "_metadata")
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.parquet$")
#: ``pyarrow.parquet.ParquetWriter`` options of every predictions file. No ``ARROW:schema`` entry:
#: the schema is plain Parquet, and the key-value metadata added as a file is closed (its bbox,
#: numbers known at the end) is then what every reader sees (:func:`write_table_file`). Every
#: page carries a CRC-32 that the readers here verify (a damaged page is an error, not numbers).
WRITE_OPTIONS = {"store_schema": False, "write_page_checksum": True}


def _not_computed(field: pa.Field) -> bool:
    """True for the optional float columns, where NaN means "not computed" and is written as null."""
    return field.nullable and pa.types.is_floating(field.type)


def _arrow(value, field: pa.Field, n: int) -> pa.Array:
    """One column of :data:`PREDICTIONS_SCHEMA` from None (nulls), a pyarrow array, a numpy
    array or a list; NaN in an optional float column becomes null (SQL and Arrow aggregates
    skip nulls; NaN would poison them)."""
    if value is None:
        return pa.nulls(n, type=field.type)
    if isinstance(value, (pa.Array, pa.ChunkedArray)):
        value = value.cast(field.type)
        value = value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value
        if _not_computed(field):
            value = pc.if_else(pc.is_nan(value), pa.scalar(None, field.type), value)
        return value
    if _not_computed(field):
        values = np.asarray(value, dtype=np.float64)  # None → NaN
        return pa.array(values, type=field.type, mask=np.isnan(values))
    return pa.array(value if isinstance(value, np.ndarray) else list(value), type=field.type)


def _values(value):
    """A column given as an Arrow array, numpy array or list, as something numpy or a list takes."""
    return value.to_numpy(zero_copy_only=False) if isinstance(value, (pa.Array, pa.ChunkedArray)) else value


def _fill_coverings(cols: dict) -> None:
    """The GeoParquet bbox covering columns (``bbox``, ``region_bbox``) of ``cols`` where not given."""
    if cols.get("bbox") is None:
        cols["bbox"] = point_covering(_values(cols["lat"]), _values(cols["lon"]))
    if cols.get("region_bbox") is None and cols.get("region") is not None:
        cols["region_bbox"] = region_covering(list(_values(cols["region"])))


def predictions_table(columns: Mapping[str, Sequence | np.ndarray | pa.Array | None], n: int) -> pa.Table:
    """A table of :data:`PREDICTIONS_SCHEMA` of ``n`` rows from column values (numpy arrays,
    pyarrow arrays or lists; missing columns are null; NaN in any optional float column — the
    :data:`TRUTH_COLUMNS` of an unlabelled record, a row ``--likelihood-every`` skipped — is
    written as null); ``geometry`` is filled from ``lat``/``lon`` and the bbox coverings from the
    geometry columns when not given."""
    cols = dict(columns)
    if cols.get("geometry") is None:
        cols["geometry"] = wkb_points(cols["lat"], cols["lon"])
    _fill_coverings(cols)
    return pa.Table.from_arrays([_arrow(cols.get(f.name), f, n) for f in PREDICTIONS_SCHEMA], schema=PREDICTIONS_SCHEMA)


def predictions_metadata(config: Mapping, model: Mapping, provenance: Mapping) -> dict[bytes, bytes]:
    """Parquet key-value metadata: ``geopipe`` (schema, config, model identity, provenance) and
    GeoParquet ``geo``."""
    meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": dict(config), "model": dict(model), **provenance}
    return {METADATA_KEY: json.dumps(meta, default=str).encode(), b"geo": json.dumps(geo_metadata()).encode()}


def conform(table: pa.Table) -> pa.Table:
    """``table`` with the columns of :data:`PREDICTIONS_SCHEMA`, in its order and types, without
    metadata (a column it lacks — a file of an older geopipe — is null; its bbox coverings are
    computed from its geometry)."""
    cols: dict = {name: table.column(name) for name in table.column_names}
    _fill_coverings(cols)
    return pa.Table.from_arrays([cols[f.name].cast(f.type) if cols.get(f.name) is not None else pa.nulls(table.num_rows, f.type)
                                 for f in PREDICTIONS_SCHEMA], schema=PREDICTIONS_SCHEMA)


def write_table_file(table: pa.Table, where, metadata: Mapping[bytes, bytes], collector: list | None = None) -> None:
    """Write ``table`` (:data:`PREDICTIONS_SCHEMA`) to ``where`` (a path or a writable file object)
    with ``metadata`` as its key-value metadata, options :data:`WRITE_OPTIONS`; ``collector``
    receives the file's footer (``pyarrow.parquet.FileMetaData``)."""
    extra = {} if collector is None else {"metadata_collector": collector}
    with pq.ParquetWriter(where, PREDICTIONS_SCHEMA, **WRITE_OPTIONS, **extra) as writer:
        writer.write_table(conform(table))
        writer.add_key_value_metadata(dict(metadata))


def write_predictions(table: pa.Table, path: str, metadata: Mapping[bytes, bytes]) -> None:
    """Write ``table`` with ``metadata`` to ``path`` (a local path or an fsspec url) atomically
    (old file or new, never half)."""
    path = fsio.normalize(path)
    if fsio.is_local(path) and os.path.isdir(path):
        raise GeopipeError(f"output {path!r} is a directory; give a file path such as {os.path.join(path, 'predictions.parquet')!r}")
    metadata = with_bbox(table, metadata)
    if not fsio.is_local(path):  # one PUT: all-or-nothing on an object store
        buf = io.BytesIO()
        write_table_file(table, buf, metadata)
        fsio.write_atomic(path, buf.getvalue())
        return
    with fsio.atomic_path(path) as tmp:
        write_table_file(table, tmp, metadata)


def part_name(start: int, stop: int) -> str:
    """File name of the part holding store rows [start, stop)."""
    return f"part-{int(start):012d}-{int(stop):012d}.parquet"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(start, stop) of a part file name; None for any other name."""
    m = _PART.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_parts(dataset: str) -> dict[tuple[int, int], str]:
    """(start, stop) → name of every complete part in ``dataset`` (none when it does not exist);
    temporaries of interrupted writes are hidden names and never listed."""
    return {rng: name for name in fsio.listdir(dataset) if (rng := parse_part_name(name)) is not None}


def file_digest(url: str) -> dict:
    """What a dataset's ``_metadata`` records of a part (:data:`PARTS_KEY`): {"sha256", "bytes"}."""
    h, size = hashlib.sha256(), 0
    with fsio.open_read(url) as fh:
        while block := fh.read(1 << 20):
            h.update(block)
            size += len(block)
    return {"sha256": h.hexdigest(), "bytes": size}


def dataset_listing(path: str) -> tuple[list[str], dict[str, dict]]:
    """(part names listed in a complete dataset's ``_metadata``, in row order; name → the digest
    recorded for it, empty for datasets written before digests)."""
    where = fsio.join(path, DATASET_METADATA[1])
    if not fsio.exists(where):
        raise GeopipeError(f"predictions dataset {path!r} is incomplete (no _metadata); rerun `geopipe predict` to finish it")
    try:
        with fsio.open_read(where) as fh:
            md = pq.read_metadata(fh)
        names = [md.row_group(i).column(0).file_path for i in range(md.num_row_groups)]
        digests = json.loads((md.metadata or {}).get(PARTS_KEY, b"{}")).get("parts", {})
    except (pa.ArrowException, OSError, ValueError, AttributeError) as exc:
        raise GeopipeError(f"predictions dataset {path!r}: its _metadata is damaged ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
                           "delete it and rerun the same `geopipe predict` to write it again") from None
    return sorted(dict.fromkeys(names), key=lambda n: parse_part_name(n) or (0, 0)), digests


def _files(path: str) -> list[tuple[str, dict | None]]:
    """(Parquet file, its recorded digest or None) of a predictions file or complete dataset
    directory, in row order."""
    is_dir = fsio.exists(fsio.join(path, DATASET_METADATA[0])) or (fsio.is_local(path) and os.path.isdir(path))
    if is_dir:
        names, digests = dataset_listing(path)
        return [(fsio.join(path, p), digests.get(p)) for p in names]
    if not fsio.isfile(path):
        raise GeopipeError(f"predictions file {path!r} does not exist")
    return [(path, None)]


def _open_parquet(url: str):
    """A file to read Parquet tables from: an Arrow ``OSFile`` for local files (tables read
    through a Python file object, still alive at interpreter exit with torch loaded, made the
    process abort there, exit status 134, in about one run of three), else fsspec's."""
    url = fsio.normalize(url)
    return pa.OSFile(url) if fsio.is_local(url) else fsio.open_read(url)


def _damaged(path: str, f: str, why: str) -> GeopipeError:
    """The one-line error for a damaged file ``f`` of the predictions ``path``."""
    if f == path:
        return GeopipeError(f"predictions file {path!r} is damaged ({why}); write it again (the command that made it, "
                            "with --overwrite)")
    return GeopipeError(f"predictions dataset {path!r}: part {f!r} is damaged ({why}); rerun the same `geopipe predict` "
                        "to write it again")


def _read_file(path: str, f: str, columns: Sequence[str] | None, digest: dict | None = None):
    """``columns`` of one Parquet file ``f`` of the predictions ``path`` (None: its schema only),
    every page's checksum verified, and first the file's SHA-256 when ``digest`` (from a dataset's
    ``_metadata``) is given; a missing or damaged file is a one-line error naming it."""
    try:
        if digest is not None and columns is not None and file_digest(f)["sha256"] != digest.get("sha256"):
            raise _damaged(path, f, "its SHA-256 differs from the one recorded in _metadata")
        with _open_parquet(f) as fh:
            return pq.read_schema(fh) if columns is None else pq.read_table(fh, columns=list(columns), page_checksum_verification=True)
    except FileNotFoundError:
        raise GeopipeError(f"predictions dataset {path!r}: part {f!r} listed in its _metadata is missing; rerun the same "
                           "`geopipe predict` to write it again") from None
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, f, f"not a readable Parquet file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _read_files(path: str, files: Sequence[tuple[str, dict | None]], columns: Sequence[str]) -> list[pa.Table]:
    """:func:`_read_file` of each (file, digest), in order."""
    return [_read_file(path, f, columns, digest) for f, digest in files]


def read_columns(path: str, names: Sequence[str]) -> pa.Table:
    """The columns of ``names`` that a predictions file or complete dataset directory has (in
    its row order, as :func:`read_predictions`); a table without columns when it has none."""
    files = _files(path)
    head = files[0][0] if files else fsio.join(path, DATASET_METADATA[0])
    present = [n for n in names if n in _read_file(path, head, None).names]
    if not present:
        return pa.table({})
    tables = _read_files(path, files, present)
    return pa.concat_tables(tables) if tables else PREDICTIONS_SCHEMA.empty_table().select(present)


def replace_columns(path: str, columns: Mapping[str, np.ndarray | None], model_extra: Mapping | None = None) -> None:
    """Rewrite the predictions *file* ``path`` (atomically) with ``columns`` set (None: null),
    and ``model_extra`` merged into the ``model`` entry of its metadata."""
    if not fsio.isfile(path):
        raise GeopipeError(f"predictions file {path!r} does not exist (only a single .parquet file can be re-scored)")
    try:
        with _open_parquet(path) as fh:
            table = pq.read_table(fh, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise _damaged(path, path, f"not a readable Parquet file: {str(exc).splitlines()[0]}") from None
    meta = dict(table.schema.metadata or {})
    for name, values in columns.items():
        i = table.schema.get_field_index(name)
        arr = _arrow(None if values is None else np.asarray(values), PREDICTIONS_SCHEMA.field(name), table.num_rows)
        table = table.set_column(i, name, arr) if i >= 0 else table.append_column(PREDICTIONS_SCHEMA.field(name), arr)
    if model_extra:
        doc = json.loads(meta[METADATA_KEY])
        doc["model"] = {**(doc.get("model") or {}), **model_extra}
        meta[METADATA_KEY] = json.dumps(doc, default=str).encode()
    write_predictions(table, path, meta)


def read_predictions(path: str) -> tuple[dict, dict]:
    """(columns, metadata) of a predictions file: ``key`` as a list of str, the
    :data:`NUMERIC_COLUMNS` present as float64 arrays. Raises GeopipeError for a missing,
    unreadable or foreign file."""
    is_dir = fsio.exists(fsio.join(path, DATASET_METADATA[0])) or (fsio.is_local(path) and os.path.isdir(path))
    if not is_dir and not fsio.isfile(path):
        raise GeopipeError(f"predictions file {path!r} does not exist")
    head = fsio.join(path, DATASET_METADATA[0]) if is_dir else path
    if is_dir:
        parts, digests = dataset_listing(path)
    try:
        with fsio.open_read(head) as fh:
            schema = pq.read_schema(fh)
    except (pa.ArrowException, OSError) as exc:
        raise GeopipeError(f"{head!r} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (schema.metadata or {}).get(METADATA_KEY)
    missing = [c for c in _REQUIRED if c not in schema.names]
    if raw is None or missing:
        why = f"missing columns {missing}" if missing else f"no {METADATA_KEY.decode()!r} metadata"
        raise GeopipeError(f"{path!r} is not a geopipe predictions file ({why}); write it with `geopipe predict`")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GeopipeError(f"{path!r}: the {METADATA_KEY.decode()!r} metadata is not valid JSON") from None
    if meta.get("schema", PREDICTIONS_SCHEMA_ID) != PREDICTIONS_SCHEMA_ID:
        raise GeopipeError(f"{path!r} has predictions schema {meta.get('schema')!r}; this geopipe reads {PREDICTIONS_SCHEMA_ID!r}")
    names = [c for c in ("key", *NUMERIC_COLUMNS) if c in schema.names]
    files = [(fsio.join(path, p), digests.get(p)) for p in parts] if is_dir else [(path, None)]
    tables = _read_files(path, files, names)
    table = pa.concat_tables(tables) if tables else PREDICTIONS_SCHEMA.empty_table().select(names)
    cols: dict = {"key": [str(k) for k in table.column("key").to_pylist()]}
    for name in names[1:]:
        try:
            cols[name] = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowException:
            raise GeopipeError(f"{path!r}: column {name!r} is not numeric") from None
    _check_degrees(path, cols)
    return cols, meta


def _check_degrees(path: str, cols: dict) -> None:
    """Coordinates must be degrees: |lat| ≤ 90, |lon| ≤ 180 where given (NaN = unknown)."""
    for name, limit in (("lat", 90.0), ("lon", 180.0), ("true_lat", 90.0), ("true_lon", 180.0)):
        values = cols.get(name)
        if values is None:
            continue
        with np.errstate(invalid="ignore"):
            bad = np.flatnonzero(np.abs(values) > limit)
        if bad.size:
            i = int(bad[0])
            raise GeopipeError(f"{path!r}: column {name!r} holds {values[i]!r} for key {cols['key'][i]!r} "
                               f"({bad.size} row(s) outside [-{limit:g}, {limit:g}] degrees); not a valid predictions file")

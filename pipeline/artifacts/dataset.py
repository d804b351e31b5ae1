"""Writing a predictions *dataset directory*: its parts, and the summary files written last.

A part (``part-<start>-<stop>.parquet``, rows [start, stop) of the store) is written atomically
by the process that scored it, which returns a :class:`PartRecord`: the part's name, footer (a
few kB) and SHA-256. :func:`finish_dataset` then writes ``_common_metadata`` and ``_metadata``:
the schema and key-value metadata with the GeoParquet ``bbox`` of every geometry column (the
union of the parts' boxes), and in ``_metadata`` every part's row groups and, under
:data:`geopipe.schemas.predictions.PARTS_KEY`, its digest, which readers check before reading
the part. A rerun finds the parts already written with :func:`existing_part`, which reads each
one whole (digest, every page's checksum) and returns None for a damaged one, to be written
again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from geopipe.pipeline.artifacts.geoparquet import BboxAccumulator, geo_boxes, with_bbox
from geopipe.pipeline.artifacts.predictions import DATASET_METADATA, dataset_listing, file_digest, part_name, write_table_file
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.predictions import PARTS_KEY, PREDICTIONS_SCHEMA

__all__ = ["PartRecord", "write_part", "read_part_footer", "existing_part", "verified_parts", "finish_dataset"]


@dataclass(frozen=True)
class PartRecord:
    """A written part: ``name`` in the dataset, its Parquet ``footer`` (file path set), its
    ``sha256`` (hex) and size in ``bytes``."""

    name: str
    footer: bytes
    sha256: str
    bytes: int


def _footer_bytes(md) -> bytes:
    sink = pa.BufferOutputStream()
    md.write_metadata_file(sink)
    return sink.getvalue().to_pybytes()


def write_part(table: pa.Table, dataset: str, start: int, stop: int, metadata: Mapping[bytes, bytes]) -> PartRecord:
    """Write rows [start, stop) atomically as ``dataset/part-<start>-<stop>.parquet`` (page
    checksums, the part's own bbox); returns its :class:`PartRecord`."""
    if table.num_rows != stop - start:
        raise ValueError(f"part [{start}, {stop}) has {table.num_rows} rows")
    collector: list = []
    buf = io.BytesIO()
    write_table_file(table, buf, with_bbox(table, metadata), collector)
    data, name = buf.getvalue(), part_name(start, stop)
    fsio.write_atomic(fsio.join(dataset, name), data)
    collector[0].set_file_path(name)
    return PartRecord(name, _footer_bytes(collector[0]), hashlib.sha256(data).hexdigest(), len(data))


def read_part_footer(dataset: str, name: str) -> bytes:
    """The footer of an existing part (file path set), reading only the footer."""
    with fsio.open_read(fsio.join(dataset, name)) as fh:
        md = pq.ParquetFile(fh).metadata
    md.set_file_path(name)
    return _footer_bytes(md)


def existing_part(dataset: str, name: str, recorded: Mapping | None = None) -> PartRecord | None:
    """The :class:`PartRecord` of a part a previous run wrote, or None when it is damaged: not a
    readable Parquet file, a page whose checksum fails, or (``recorded``: the digest an earlier
    ``_metadata`` holds for it) other bytes than were written."""
    url = fsio.join(dataset, name)
    try:
        digest = file_digest(url)
        if recorded is not None and recorded.get("sha256") != digest["sha256"]:
            return None
        with fsio.open_read(url) as fh:
            pf = pq.ParquetFile(fh, page_checksum_verification=True)
            for i in range(pf.num_row_groups):  # one row group at a time: every page's checksum
                pf.read_row_group(i)
        return PartRecord(name, read_part_footer(dataset, name), digest["sha256"], digest["bytes"])
    except (pa.ArrowException, OSError, ValueError):
        return None


def verified_parts(dataset: str, parts: Mapping) -> tuple[dict, list[str]]:
    """(key → :class:`PartRecord` of each whole part of ``parts`` (key → part name), names of the
    damaged ones, which are removed so that they are written again); the digests an earlier
    ``_metadata`` recorded are checked too."""
    try:
        recorded = dataset_listing(dataset)[1] if fsio.exists(fsio.join(dataset, DATASET_METADATA[1])) else {}
    except GeopipeError:  # a damaged _metadata: the parts are checked on their own
        recorded = {}
    good, damaged = {}, []
    for key, name in parts.items():
        record = existing_part(dataset, name, recorded.get(name))
        if record is None:
            damaged.append(name)
            fsio.remove(fsio.join(dataset, name))
        else:
            good[key] = record
    return good, damaged


def finish_dataset(dataset: str, parts: Sequence[PartRecord], metadata: Mapping[bytes, bytes]) -> None:
    """Write ``_common_metadata`` and ``_metadata`` from the ``parts`` (in row order): the bbox of
    every geometry column is the union of the parts' boxes; ``_metadata`` also lists each part's
    row groups and digest."""
    mds = [pq.read_metadata(pa.BufferReader(p.footer)) for p in parts]
    boxes = BboxAccumulator()
    for md in mds:
        boxes.merge(geo_boxes(md.metadata))
    common = boxes.metadata(metadata)
    digests = {"algorithm": "sha256",
               "parts": {p.name: {"sha256": p.sha256, "bytes": p.bytes, "rows": md.num_rows} for p, md in zip(parts, mds)}}
    full = {**common, PARTS_KEY: json.dumps(digests).encode()}
    for name, meta, collector in zip(DATASET_METADATA, (common, full), ([], mds)):
        buf = io.BytesIO()
        pq.write_metadata(PREDICTIONS_SCHEMA.with_metadata(meta), buf, metadata_collector=collector)
        fsio.write_atomic(fsio.join(dataset, name), buf.getvalue())

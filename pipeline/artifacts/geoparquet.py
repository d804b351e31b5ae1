"""The GeoParquet 1.1 parts of a predictions file: WKB points, bbox covering columns, and the
``geo`` metadata's per-column ``bbox`` — of one file, of a file written block by block, and of a
dataset (the union over its parts).

A *bbox covering* column (:data:`geopipe.schemas.predictions.COVERINGS`) holds each row's
geometry extent as a struct ``xmin, ymin, xmax, ymax`` (degrees, x = longitude); Parquet keeps
min/max statistics of its four fields per row group, so a reader filtering on a window
(``geopandas.read_parquet(p, bbox=…)``, ``WHERE bbox.xmin <= …`` in duckdb) skips row groups
without decoding any WKB. Boxes here are ``(min lon, min lat, max lon, max lat)`` tuples or None
(no finite geometry).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geopipe.schemas.predictions import BBOX_TYPE, COVERINGS, geo_metadata

__all__ = ["Box", "wkb_points", "point_covering", "region_covering", "covering_box", "union", "BboxAccumulator", "with_bbox",
           "geo_boxes"]

Box = tuple[float, float, float, float]


def wkb_points(lat: np.ndarray, lon: np.ndarray) -> list[bytes]:
    """Little-endian WKB points in (lon, lat) order, degrees: one ``bytes`` per record."""
    head = b"\x01\x01\x00\x00\x00"
    xy = np.stack([np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)], axis=1).astype("<f8")
    return [head + row.tobytes() for row in xy]


def _boxes(xmin, ymin, xmax, ymax, valid: np.ndarray) -> pa.StructArray:
    """A :data:`BBOX_TYPE` array of the given (n,) bounds, null where not ``valid``."""
    fields = [pa.array(np.asarray(v, dtype=np.float64), mask=~valid) for v in (xmin, ymin, xmax, ymax)]
    return pa.StructArray.from_arrays(fields, fields=list(BBOX_TYPE), mask=pa.array(~valid))


def point_covering(lat, lon) -> pa.StructArray:
    """The covering of points (degrees): xmin = xmax = lon, ymin = ymax = lat; null where not finite."""
    lat, lon = (np.asarray(v, dtype=np.float64) for v in (lat, lon))
    return _boxes(lon, lat, lon, lat, np.isfinite(lat) & np.isfinite(lon))


def region_covering(wkb: Sequence[bytes | None]) -> pa.StructArray:
    """The covering of WKB (Multi)Polygons: their bounds; null for a null or empty polygon."""
    import shapely

    wkb = list(wkb)
    bounds = np.full((len(wkb), 4), np.nan)
    rows = [i for i, w in enumerate(wkb) if w]
    if rows:
        bounds[rows] = shapely.bounds(shapely.from_wkb([wkb[i] for i in rows]))
    return _boxes(*bounds.T, np.isfinite(bounds).all(axis=1))


def covering_box(column: pa.Array | pa.ChunkedArray) -> Box | None:
    """The box holding every non-null box of a covering column, or None."""
    if len(column) == column.null_count:
        return None
    parts = [pc.min_max(pc.struct_field(column, [i])).as_py() for i in range(4)]
    return (parts[0]["min"], parts[1]["min"], parts[2]["max"], parts[3]["max"])


def union(boxes: Iterable[Box | None]) -> Box | None:
    """The box holding all ``boxes`` (None ones left out); None when all are None."""
    out = None
    for b in boxes:
        if b is not None:
            out = b if out is None else (min(out[0], b[0]), min(out[1], b[1]), max(out[2], b[2]), max(out[3], b[3]))
    return None if out is None else tuple(float(v) for v in out)


class BboxAccumulator:
    """The GeoParquet bboxes of a file written block by block: :meth:`add` each block's table
    (with its covering columns), then :meth:`metadata` gives the key-value metadata with them."""

    def __init__(self):
        self.boxes: dict[str, Box | None] = dict.fromkeys(COVERINGS)

    def add(self, table: pa.Table) -> None:
        for geometry, covering in COVERINGS.items():
            if covering in table.column_names:
                self.boxes[geometry] = union([self.boxes[geometry], covering_box(table.column(covering))])

    def merge(self, boxes: Mapping[str, Box | None]) -> None:
        """Add boxes already computed (per geometry column), e.g. a dataset part's."""
        for geometry in COVERINGS:
            self.boxes[geometry] = union([self.boxes[geometry], boxes.get(geometry)])

    def metadata(self, metadata: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
        """``metadata`` with its ``geo`` entry replaced by the one with these bboxes."""
        geo = geo_metadata(self.boxes["geometry"], self.boxes["region"])
        return {**metadata, b"geo": json.dumps(geo).encode()}


def with_bbox(table: pa.Table, metadata: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """``metadata`` with the GeoParquet ``bbox`` of ``table``'s predicted points and of its HDR
    ``region`` polygons (degrees; none for a column without finite points or polygons)."""
    acc = BboxAccumulator()
    acc.add(table)
    return acc.metadata(metadata)


def geo_boxes(metadata: Mapping[bytes, bytes] | None) -> dict[str, Box | None]:
    """Geometry column → the ``bbox`` its ``geo`` metadata states (None where absent)."""
    try:
        columns = json.loads((metadata or {})[b"geo"])["columns"]
    except (KeyError, ValueError, TypeError):
        return dict.fromkeys(COVERINGS)
    return {name: tuple(columns[name]["bbox"]) if "bbox" in columns.get(name, {}) else None for name in COVERINGS}

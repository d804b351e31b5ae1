"""Predictions table (Parquet, schema ``geopipe.predictions/1``): one row per record.

Coordinates are degrees; distances km; log-likelihoods nats per record (per steradian on
S², per unit volume in R³ — not comparable across the two, see docs/methods.md#units). Optional columns
are null — never NaN — where a quantity was not requested or not computed for a record (an
unlabelled record's truth, the rows ``--likelihood-every`` skips, an R³ model's area), so SQL and
Arrow aggregates skip them. ``geometry`` is a WKB point (GeoParquet 1.1,
lon/lat order, WGS 84) so GIS tools open the file directly: the ``geo`` metadata names no
``crs``, which GeoParquet defines as OGC:CRS84 (WGS 84 longitude/latitude, what geopandas reads
as ``OGC:CRS84`` and reprojects with ``to_crs``; an explicit null would mean "unknown CRS"), and
carries the column's ``bbox`` [min lon, min lat, max lon, max lat] (of the file; in a dataset's
``_metadata``, of all its parts). Each geometry column has a GeoParquet 1.1 *bbox covering*
column (:data:`COVERINGS`: ``bbox`` of ``geometry``, ``region_bbox`` of ``region``; a struct
xmin/ymin/xmax/ymax in degrees, null where the geometry is) declared in its ``covering`` entry,
so ``geopandas.read_parquet(p, bbox=…)`` and SQL filters on ``bbox.xmin`` … skip row groups by
their statistics. ``region``
is a second geometry column (WKB Polygon/MultiPolygon, same CRS, its own bbox): the highest-density
region of mass q (``geopipe predict --region q``; q is in the config metadata), with
``region_mass`` and ``region_area_km2`` (km² on the sphere of radius R_E). Key-value metadata
``geopipe`` holds JSON: {"schema", "config", "model", "version", "git_rev"}.

Integrity: every data page carries a CRC-32 (Parquet page checksums, verified on read), and a
dataset directory's ``_metadata`` holds :data:`PARTS_KEY`: JSON {"algorithm": "sha256",
"parts": {part name: {"sha256", "bytes", "rows"}}}, each part's digest, checked before a part is
read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

__all__ = ["PREDICTIONS_SCHEMA_ID", "PREDICTIONS_SCHEMA", "METADATA_KEY", "PARTS_KEY", "BBOX_TYPE", "COVERINGS", "GEO_METADATA",
           "geo_metadata", "ScoreColumn", "SCORE_SOURCES", "UNCERTAINTY_SCORES", "score_columns"]

PREDICTIONS_SCHEMA_ID = "geopipe.predictions/1"
METADATA_KEY = b"geopipe"
#: Key-value metadata of a dataset's ``_metadata``: the digest of each part (see the module docstring).
PARTS_KEY = b"geopipe.parts"
#: A GeoParquet 1.1 bbox covering: one geometry's extent, degrees (x = longitude, y = latitude).
BBOX_TYPE = pa.struct([pa.field(name, pa.float64()) for name in ("xmin", "ymin", "xmax", "ymax")])
#: Geometry column → its bbox covering column.
COVERINGS = {"geometry": "bbox", "region": "region_bbox"}


@dataclass(frozen=True)
class ScoreColumn:
    """An uncertainty score column of the predictions table: float64, higher = more uncertain
    (``geopipe evaluate --uncertainty`` ranks failures by it). ``source``: one of
    :data:`SCORE_SOURCES`, what fills the column."""

    name: str
    source: str
    doc: str


#: What fills a score column: the training-free scores of a retrieval's top-K (``geopipe
#: retrieve``, always), or a BayesCap checkpoint — its heads (aleatoric) and MC dropout over
#: them (epistemic) — given with ``--bayescap`` to retrieve or predict (null otherwise).
SCORE_SOURCES = {"retrieval": "training-free, from the top-K of geopipe retrieve",
                 "bayescap": "BayesCap heads and MC dropout (--bayescap of retrieve or predict)"}

#: Every uncertainty score column, in table order. Adding a score: one entry here and its
#: function (the library functions return their source's columns, and a test holds them equal).
UNCERTAINTY_SCORES: tuple[ScoreColumn, ...] = (
    ScoreColumn("log_u", "bayescap", "log of the geometric mean of the total (aleatoric + epistemic) per-feature variance"),
    ScoreColumn("log_u_alea", "bayescap", "aleatoric part of log_u"),
    ScoreColumn("log_u_epi", "bayescap", "epistemic part of log_u (MC dropout)"),
    ScoreColumn("u_dist1", "retrieval", "descriptor distance to the top-1"),
    ScoreColumn("u_ratio12", "retrieval", "d1 / d2"),
    ScoreColumn("u_spread_km", "retrieval", "spatial spread of the top-K, km"),
    ScoreColumn("u_geo_inconsistency", "retrieval", "1 − fraction of the top-K within 25 m of the top-1"),
)


def score_columns(source: str | None = None) -> tuple[str, ...]:
    """Names of the uncertainty score columns (of one ``source`` of :data:`SCORE_SOURCES`, or all), in table order."""
    if source is not None and source not in SCORE_SOURCES:
        raise ValueError(f"unknown score source {source!r}; choose one of {list(SCORE_SOURCES)}")
    return tuple(s.name for s in UNCERTAINTY_SCORES if source is None or s.source == source)


PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("lat", pa.float64(), nullable=False),  # predicted latitude, degrees
        pa.field("lon", pa.float64(), nullable=False),  # predicted longitude, degrees
        pa.field("true_lat", pa.float64()),
        pa.field("true_lon", pa.float64()),
        pa.field("distance_km", pa.float64()),  # haversine(pred, truth), R = 6371.0088 km
        pa.field("log_likelihood", pa.float64()),  # log p(truth | image), nats
        pa.field("neg_entropy_nats", pa.float64()),  # localizability −H, nats (R³ models: per unit volume)
        pa.field("entropy_bits", pa.float64()),
        pa.field("effective_area_km2", pa.float64()),  # exp(H)·R_E² (S² models; null for R³ ones)
        pa.field("hdr_rank", pa.float64()),  # fraction of samples denser than the truth (docs/methods.md#calibration)
        pa.field("sample_lat", pa.list_(pa.float64())),  # optional extra samples, degrees
        pa.field("sample_lon", pa.list_(pa.float64())),
        # retrieval (geopipe retrieve): the top-K database records, best first
        pa.field("topk_keys", pa.list_(pa.string())),
        pa.field("topk_distance", pa.list_(pa.float64())),  # descriptor distance (squared L2; 2 − 2cos for unit vectors)
        pa.field("topk_lat", pa.list_(pa.float64())),  # degrees
        pa.field("topk_lon", pa.list_(pa.float64())),
        pa.field("answerable", pa.bool_()),  # the database holds a record within the positive radius (25 m) of the truth
        # uncertainty scores (float64, higher = more uncertain), declared once in UNCERTAINTY_SCORES
        *(pa.field(score.name, pa.float64()) for score in UNCERTAINTY_SCORES),
        pa.field("geometry", pa.binary()),  # WKB point of the prediction
        pa.field("bbox", BBOX_TYPE),  # its GeoParquet covering: xmin = xmax = lon, ymin = ymax = lat
        # highest-density region (geopipe predict --region q; pipeline/infer/regions.py): null when not requested
        pa.field("region", pa.binary()),  # WKB Polygon/MultiPolygon, lon/lat degrees (OGC:CRS84), cut at the antimeridian
        pa.field("region_bbox", BBOX_TYPE),  # its GeoParquet covering (extent of the polygon's parts)
        pa.field("region_mass", pa.float64()),  # probability inside it (≈ q; on the grid it was contoured on)
        pa.field("region_area_km2", pa.float64()),  # its area on the sphere of radius 6371.0088 km
    ]
)

#: GeoParquet "geo" metadata value for the geometry columns (the point ``geometry``, primary, and the
#: HDR polygon ``region``), each with its bbox covering column; no "crs" key: OGC:CRS84 (WGS 84 lon/lat).
GEO_METADATA = {
    "version": "1.1.0",
    "primary_column": "geometry",
    "columns": {name: {"encoding": "WKB", "geometry_types": types,
                       "covering": {"bbox": {k: [COVERINGS[name], k] for k in ("xmin", "ymin", "xmax", "ymax")}}}
                for name, types in (("geometry", ["Point"]), ("region", ["Polygon", "MultiPolygon"]))},
}


def geo_metadata(bbox: tuple[float, float, float, float] | None = None, region_bbox: tuple[float, float, float, float] | None = None) -> dict:
    """The GeoParquet "geo" value, with each geometry column's ``bbox`` (min lon, min lat, max lon,
    max lat in degrees) when given: readers use it to skip files outside a query window."""
    columns = {}
    for name, box in (("geometry", bbox), ("region", region_bbox)):
        columns[name] = dict(GEO_METADATA["columns"][name])
        if box is not None:
            columns[name]["bbox"] = [float(v) for v in box]
    return {**GEO_METADATA, "columns": columns}

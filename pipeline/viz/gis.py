"""GIS files of one record's predicted distribution: the density grid as a GeoTIFF, the
highest-density region (and the points) as GeoJSON.

* GeoTIFF (:func:`write_density_geotiff`): one float32 band of **probability density per km²**
  (p_sr / R_E², R_E = 6371.0088 km; multiply by a cell's area in km² for its probability) on the
  grid's cells, rows north to south; georeferenced in EPSG:4326 longitude/latitude degrees with the
  GeoTIFF tags ModelPixelScale (Δlon, Δlat, 0), ModelTiepoint (pixel (0, 0) ↦ west edge, north
  edge) and GeoKeyDirectory (geographic model, PixelIsArea, GCS 4326, angular unit degree). The
  unit is also written in the ImageDescription and in GDAL_METADATA (band unit type), which GDAL,
  rasterio and QGIS read. Written with Pillow: no GDAL needed.
* GeoJSON (:func:`region_features`, :func:`write_geojson`): an RFC 7946 FeatureCollection in
  OGC:CRS84 (lon, lat degrees; exteriors counter-clockwise; cut at the antimeridian) whose
  properties state their units (area in km², log τ in nats per km² and per steradian).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM
from geopipe.pipeline.viz.density_grid import DensityGrid

__all__ = ["DENSITY_UNITS", "GEOTIFF_TAGS", "write_density_geotiff", "region_features", "point_feature", "write_geojson"]

#: Unit of the GeoTIFF band.
DENSITY_UNITS = "probability per km^2"
#: GeoTIFF tag numbers: ModelPixelScale, ModelTiepoint, GeoKeyDirectory, GDAL_METADATA.
GEOTIFF_TAGS = {"ModelPixelScale": 33550, "ModelTiepoint": 33922, "GeoKeyDirectory": 34735, "GDAL_METADATA": 42112}
# GeoKeyDirectory: header (version 1, revision 1.0, 4 keys), then (key, location 0 = value inline, count 1, value):
# GTModelType = 2 geographic, GTRasterType = 1 PixelIsArea, GeographicType = 4326 WGS 84, GeogAngularUnits = 9102 degree
_GEOKEYS = (1, 1, 0, 4, 1024, 0, 1, 2, 1025, 0, 1, 1, 2048, 0, 1, 4326, 2054, 0, 1, 9102)


def _spacing(v: np.ndarray, what: str) -> float:
    d = np.diff(np.asarray(v, dtype=np.float64))
    if len(v) < 2 or not np.allclose(d, d[0], rtol=1e-6, atol=1e-9) or d[0] <= 0:
        raise ValueError(f"GeoTIFF needs ≥ 2 evenly spaced increasing {what} cell centres")
    return float(d[0])


def write_density_geotiff(path: str, grid: DensityGrid, *, description: str = "") -> str:
    """Write ``grid`` (cell-centred lats (H,), lons (W,) degrees; logp (H, W) nats per steradian)
    as a float32 GeoTIFF of density per km² at ``path``; returns the path."""
    from PIL import Image, TiffImagePlugin, TiffTags

    dlat, dlon = _spacing(grid.lats, "latitude"), _spacing(grid.lons, "longitude")
    density = np.exp(np.asarray(grid.logp, dtype=np.float64) - 2.0 * math.log(EARTH_RADIUS_KM))
    image = Image.fromarray(np.ascontiguousarray(np.flipud(np.where(np.isfinite(density), density, 0.0)).astype(np.float32)))
    west, north = float(grid.lons[0]) - dlon / 2.0, float(grid.lats[-1]) + dlat / 2.0
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    tags = {GEOTIFF_TAGS["ModelPixelScale"]: ((dlon, dlat, 0.0), TiffTags.DOUBLE),
            GEOTIFF_TAGS["ModelTiepoint"]: ((0.0, 0.0, 0.0, west, north, 0.0), TiffTags.DOUBLE),
            GEOTIFF_TAGS["GeoKeyDirectory"]: (_GEOKEYS, TiffTags.SHORT),
            GEOTIFF_TAGS["GDAL_METADATA"]: (_gdal_metadata(_ascii(description)), TiffTags.ASCII),
            270: (f"{DENSITY_UNITS} (EPSG:4326 lon/lat cells; {_ascii(description)})", TiffTags.ASCII)}
    for tag, (value, kind) in tags.items():
        ifd[tag] = value
        ifd.tagtype[tag] = kind
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, format="TIFF", tiffinfo=ifd)
    return path


_ASCII = {"·": "-", "σ": "sigma", "°": " deg", "²": "^2", "³": "3", "≈": "~", "→": "->", "κ": "kappa", "—": "-", "–": "-"}


def _ascii(text: str) -> str:
    """TIFF ASCII tags hold 7-bit text: common symbols spelt out, anything else as '?'."""
    for k, v in _ASCII.items():
        text = text.replace(k, v)
    return text.encode("ascii", "replace").decode("ascii")


def _gdal_metadata(description: str) -> str:
    """GDAL's XML metadata: the band's unit type and a dataset-level note."""
    from xml.sax.saxutils import escape

    return ("<GDALMetadata>"
            f'<Item name="units">{escape(DENSITY_UNITS)}</Item>'
            f'<Item name="description">{escape(description)}</Item>'
            f'<Item name="UNITTYPE" sample="0" role="unittype">{escape(DENSITY_UNITS)}</Item>'
            "</GDALMetadata>")


def _finite(v):
    """JSON-safe number: NaN/inf → None (RFC 8259 has no NaN)."""
    return float(v) if v is not None and math.isfinite(float(v)) else None


def region_features(region, **properties) -> dict:
    """A GeoJSON Feature of an :class:`~geopipe.pipeline.infer.regions.HDRRegion` (geometry null
    when empty), with q, mass, area_km2, log τ per km² and per steradian, their units, and
    ``properties``."""
    from shapely.geometry import mapping

    geometry = None if region.geometry.is_empty else json.loads(json.dumps(mapping(region.geometry)))
    props = {"kind": "hdr", "q": region.q, "mass": _finite(region.mass), "area_km2": _finite(region.area_km2),
             "log_tau_per_km2": _finite(region.log_tau_km2), "log_tau_per_sr": _finite(region.log_tau_sr), "tau_from": region.tau_from,
             "units": {"area_km2": "km^2", "log_tau_per_km2": "nats (log of probability per km^2)",
                       "log_tau_per_sr": "nats (log of probability per steradian)", "mass": "probability"},
             **properties}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def point_feature(lat: float, lon: float, **properties) -> dict:
    """A GeoJSON Point Feature at (lat, lon) degrees (coordinates in lon, lat order)."""
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [float(lon), float(lat)]}, "properties": dict(properties)}


def write_geojson(path: str, features: list[dict]) -> str:
    """Write an RFC 7946 FeatureCollection of ``features`` (OGC:CRS84, no "crs" member) at ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"type": "FeatureCollection", "features": features}, fh, allow_nan=False)
    return path

"""geopipe map's GIS files (pipeline/viz/gis.py, stages/maps.py): the density grid as a GeoTIFF
georeferenced in EPSG:4326, the highest-density region as RFC 7946 GeoJSON."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import shapely
import torch
from PIL import Image
from tiny_models import tiny_store, untrained_checkpoint

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture, vmf_log_density
from geopipe.pipeline.viz.density_grid import DensityGrid, density_grid_kde, grid_mass, latlon_grid
from geopipe.pipeline.viz.gis import DENSITY_UNITS, GEOTIFF_TAGS, write_density_geotiff

F64 = torch.float64
SAO_PAULO = (-23.5, -46.6)


def _georef(path):
    """(array rows north→south, west, north, Δlon, Δlat, geokeys, tags) read back with Pillow."""
    im = Image.open(path)
    sx, sy, _ = im.tag_v2[GEOTIFF_TAGS["ModelPixelScale"]]
    i, j, _, x, y, _ = im.tag_v2[GEOTIFF_TAGS["ModelTiepoint"]]
    assert (i, j) == (0.0, 0.0)
    keys = im.tag_v2[GEOTIFF_TAGS["GeoKeyDirectory"]]
    return np.array(im), x, y, sx, sy, dict(zip(keys[4::4], keys[7::4])), im.tag_v2


@pytest.mark.parametrize("extent", [None, (-60.0, -20.0, -40.0, -5.0)])
def test_geotiff_round_trips_density_per_km2_and_georeferencing(tmp_path, extent):
    lats, lons = latlon_grid(5.0, extent)
    mu = latlon_to_xyz(torch.tensor(SAO_PAULO, dtype=F64))
    ll = torch.from_numpy(np.stack(np.meshgrid(lats, lons, indexing="ij"), -1).reshape(-1, 2))
    grid = DensityGrid(lats, lons, vmf_log_density(latlon_to_xyz(ll), mu, torch.tensor(30.0, dtype=F64)).numpy().reshape(len(lats), -1))
    a, west, north, dlon, dlat, geokeys, tags = _georef(write_density_geotiff(str(tmp_path / "d.tif"), grid, description="k"))
    assert a.dtype == np.float32 and a.shape == grid.logp.shape
    assert geokeys == {1024: 2, 1025: 1, 2048: 4326, 2054: 9102}  # geographic, PixelIsArea, WGS 84, degree
    assert DENSITY_UNITS in tags[270] and 'role="unittype">probability per km^2<' in tags[GEOTIFF_TAGS["GDAL_METADATA"]]
    # pixel (row r, col c) covers lon west + [c, c+1)·Δlon, lat north − [r, r+1)·Δlat: its centre is the grid's cell
    rows, cols = np.meshgrid(np.arange(a.shape[0]), np.arange(a.shape[1]), indexing="ij")
    np.testing.assert_allclose(west + (cols[0] + 0.5) * dlon, lons, atol=1e-9)
    np.testing.assert_allclose(north - (rows[:, 0] + 0.5) * dlat, lats[::-1], atol=1e-9)
    np.testing.assert_allclose(a, np.exp(grid.logp[::-1]) / EARTH_RADIUS_KM**2, rtol=1e-6)
    # density per km² × exact cell area in km² sums to the grid's probability (grid_mass: cos φ·Δφ·Δλ, 3e-4 apart at 5°)
    cell_km2 = np.radians(dlon) * np.abs(np.diff(np.sin(np.radians(north - dlat * np.arange(a.shape[0] + 1))))) * EARTH_RADIUS_KM**2
    assert float(np.sum(a * cell_km2[:, None])) == pytest.approx(grid_mass(grid), rel=1e-3)


def test_geotiff_refuses_uneven_or_single_cell_grids(tmp_path):
    with pytest.raises(ValueError, match="evenly spaced"):
        write_density_geotiff(str(tmp_path / "x.tif"), DensityGrid(np.array([0.0, 1.0, 3.0]), np.array([0.0, 1.0]), np.zeros((3, 2))))


class _VMF:
    """Stand-in method: vMF around cond[:3] with concentration cond[3] (closed form)."""

    name, space = "vmf-like", "sphere"

    def log_likelihood(self, model, x, cond, **kw):
        return vmf_log_density(x, cond[:, :3], cond[:, 3])

    def sample(self, model, cond, n, *, generator=None, **kw):
        return sample_vmf_mixture(cond[:, None, :3], cond[:, 3:4], torch.ones_like(cond[:, 3:4]), n, generator=generator)


@pytest.mark.parametrize("mode", ["loglik", "kde"])
def test_map_writes_geotiff_and_a_geojson_region_of_known_area(tmp_path, mode, monkeypatch):
    gpd = pytest.importorskip("geopandas")
    import geopipe.stages.maps as stage

    monkeypatch.setattr(stage, "render_density_map", lambda path, *grid, **kw: path)  # the PNG is test_maps.py's
    from geopipe.pipeline.infer.predictor import Predictor
    from geopipe.pipeline.model.conditioning import CondStats

    kappa = 2000.0  # σ = R/√κ ≈ 140 km; the 0.9-HDR is the cap 1 − c = −ln(1 − 0.9)/κ
    p = Predictor(_VMF(), torch.nn.Linear(1, 1).double(), {}, torch.device("cpu"), cond_stats=CondStats.identity(4))
    cond = torch.cat([latlon_to_xyz(torch.tensor(SAO_PAULO, dtype=F64)), torch.tensor([kappa], dtype=F64)])[None]
    cfg = stage.MapConfig("c", "s", str(tmp_path), mode=mode, resolution_deg=3.0, kde_samples=2000, region=0.9, progress=False)
    drawn = stage._draw_record(cfg, p, cond, torch.Generator().manual_seed(0), "a/b", (-22.9, -43.2), SAO_PAULO)
    assert drawn.raster.endswith("map-a_b.tif") and drawn.region.endswith("map-a_b.geojson")
    a, west, north, dlon, dlat, geokeys, tags = _georef(drawn.raster)
    r, c = np.unravel_index(np.argmax(a), a.shape)  # the densest pixel holds μ (zoomed regional grid)
    assert abs(west + (c + 0.5) * dlon - SAO_PAULO[1]) <= dlon and abs(north - (r + 0.5) * dlat - SAO_PAULO[0]) <= dlat
    doc = json.load(open(drawn.region))
    assert doc["type"] == "FeatureCollection" and "crs" not in doc
    hdr, pred, truth = doc["features"]
    assert [f["properties"]["kind"] for f in doc["features"]] == ["hdr", "prediction", "truth"]
    assert truth["geometry"] == {"type": "Point", "coordinates": [-43.2, -22.9]}  # lon, lat
    geom = shapely.geometry.shape(hdr["geometry"])
    assert geom.is_valid and geom.geom_type == "Polygon" and geom.exterior.is_ccw  # RFC 7946 right-hand rule
    props = hdr["properties"]
    assert props["q"] == 0.9 and props["units"]["area_km2"] == "km^2" and "per km^2" in props["units"]["log_tau_per_km2"]
    assert props["mass"] == pytest.approx(0.9, abs=0.005)
    if mode == "kde":  # the KDE is the vMF smoothed by its kernel: ≈ a vMF of 1/κ_eff = 1/κ + 1/κ_kernel (small angles)
        bw = float(re.search(r"sigma = ([\d,]+) km", tags[270]).group(1).replace(",", ""))
        kappa = 1.0 / (1.0 / kappa + (bw / EARTH_RADIUS_KM) ** 2)
    cap = 2 * math.pi * EARTH_RADIUS_KM**2 * -math.log1p(-0.9 * -math.expm1(-2 * kappa)) / kappa
    print(f"{mode}: area {props['area_km2']:.6g} km², closed form {cap:.6g} km² ({props['area_km2'] / cap - 1:+.2%})")
    assert props["area_km2"] == pytest.approx(cap, rel=0.02 if mode == "loglik" else 0.05)
    if mode == "loglik":
        x = sample_vmf_mixture(cond[:, None, :3], cond[:, 3:4], torch.ones(1, 1, dtype=F64), 100_000, generator=torch.Generator().manual_seed(1))[0]
        lat, lon = np.degrees(np.arcsin(x[:, 2].numpy())), np.degrees(np.arctan2(x[:, 1].numpy(), x[:, 0].numpy()))
        assert float(shapely.contains_xy(geom, lon, lat).mean()) == pytest.approx(0.9, abs=0.01)
    gdf = gpd.read_file(drawn.region)  # GIS readers take it as WGS 84 lon/lat
    assert gdf.crs.to_epsg() == 4326 and list(gdf.geom_type) == ["Polygon", "Point", "Point"]


def test_cli_map_writes_gis_files_and_region_zero_skips_the_geojson(tmp_path):
    from click.testing import CliRunner

    from geopipe.flows.cli_maps import map_command

    store, ckpt = tiny_store(tmp_path / "s.zarr"), untrained_checkpoint(tmp_path / "ckpt", "vmf")
    args = ["-c", ckpt, "--store", store, "--key", "rec/1", "--resolution", "30", "--device", "cpu"]
    ok = CliRunner().invoke(map_command, [*args, "-o", str(tmp_path / "m")])
    assert ok.exit_code == 0, ok.output
    assert "map-rec_1.tif" in ok.output and "map-rec_1.geojson" in ok.output
    doc = json.load(open(tmp_path / "m" / "map-rec_1.geojson"))
    assert doc["features"][0]["properties"]["mass"] == pytest.approx(0.9, abs=0.01)
    Image.open(tmp_path / "m" / "map-rec_1.tif").verify()
    none = CliRunner().invoke(map_command, [*args, "-o", str(tmp_path / "n"), "--region", "0"])
    assert none.exit_code == 0 and (tmp_path / "n" / "map-rec_1.tif").is_file() and not (tmp_path / "n" / "map-rec_1.geojson").exists()
    bad = CliRunner().invoke(map_command, [*args, "-o", str(tmp_path / "b"), "--region", "1.5"])
    assert bad.exit_code == 1 and "--region must be a probability mass in (0, 1)" in bad.output


def test_kde_log_density_matches_the_kde_grid():
    from geopipe.pipeline.sphere.kde import kde_log_density

    x = sample_vmf_mixture(latlon_to_xyz(torch.tensor([[10.0, 20.0]], dtype=F64))[None], torch.tensor([[50.0]], dtype=F64),
                           torch.ones(1, 1, dtype=F64), 64, generator=torch.Generator().manual_seed(0))[0].numpy()
    grid = density_grid_kde(x, 10.0, kappa=300.0)
    ll = torch.from_numpy(np.stack(np.meshgrid(grid.lats, grid.lons, indexing="ij"), -1).reshape(-1, 2))
    np.testing.assert_allclose(kde_log_density(x, 300.0, latlon_to_xyz(ll).numpy()), grid.logp.ravel(), atol=1e-9)

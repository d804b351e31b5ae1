"""Density maps and calibration plots: pipeline/maps.py, pipeline/land_outline.py, stages/maps.py, flows/cli_maps.py."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, LOG_UNIFORM_SPHERE, latlon_to_xyz
from geopipe.pipeline.sphere.kde import kde_bandwidth_km
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture, vmf_log_density, vmf_mixture_log_density
from geopipe.pipeline.viz.density_grid import density_grid_kde, density_grid_loglik, grid_mass, hdr_extent, latlon_grid
from geopipe.pipeline.viz.land_outline import load_outline, outline_from_shapefile
from geopipe.pipeline.viz.render import render_calibration_plot, render_density_map
from geopipe.schemas.report import REPORT_SCHEMA_ID

LEVELS = [i / 10 for i in range(1, 10)]


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _mixture_samples(n: int, seed: int = 0) -> torch.Tensor:
    mu = latlon_to_xyz(torch.tensor([[48.8, 2.3], [40.7, -74.0], [-33.9, 151.2]], dtype=torch.float64))[None]
    kappa = torch.tensor([[300.0, 80.0, 1500.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    return sample_vmf_mixture(mu, kappa, w, n, generator=torch.Generator().manual_seed(seed))[0]


# --------------------------------------------------------------------------- grids


def test_latlon_grid_cell_centres_and_validation():
    lats, lons = latlon_grid(3.0)
    assert lats.shape == (60,) and lons.shape == (120,)
    assert lats[0] == -88.5 and lats[-1] == 88.5 and lons[0] == -178.5 and lons[-1] == 178.5
    for bad in (0.0, -1.0, 7.0, 45.0):
        with pytest.raises(ValueError, match="resolution_deg"):
            latlon_grid(bad)


@pytest.mark.parametrize("bandwidth_km", [None, 300.0, 1000.0, 4000.0])
def test_kde_grid_integrates_to_one(bandwidth_km):
    grid = density_grid_kde(_mixture_samples(512).numpy(), 3.0, bandwidth_km=bandwidth_km)
    assert grid.logp.shape == (60, 120)
    assert grid_mass(grid) == pytest.approx(1.0, abs=0.02)


def test_kde_matches_the_vmf_mixture_formula_and_peaks_at_a_lone_sample():
    x = _mixture_samples(64, seed=1)
    kappa = 200.0
    grid = density_grid_kde(x.numpy(), 5.0, kappa=kappa)
    cells = latlon_to_xyz(torch.from_numpy(np.stack(np.meshgrid(grid.lats, grid.lons, indexing="ij"), -1).reshape(-1, 2)))
    n = len(x)
    ref = vmf_mixture_log_density(cells, x.expand(len(cells), n, 3), torch.full((len(cells), n), kappa, dtype=torch.float64),
                                  torch.full((len(cells), n), 1.0 / n, dtype=torch.float64))
    np.testing.assert_allclose(grid.logp.reshape(-1), ref.numpy(), atol=1e-6)
    lone = latlon_to_xyz(torch.tensor([[21.5, -101.5]], dtype=torch.float64))  # a cell centre at 1°
    g1 = density_grid_kde(lone.numpy(), 1.0, bandwidth_km=300.0)
    i, j = np.unravel_index(np.argmax(g1.logp), g1.logp.shape)
    assert (g1.lats[i], g1.lons[j]) == (21.5, -101.5)


def test_kde_bandwidth_is_local_and_floored_at_a_cell():
    x = _mixture_samples(2048).numpy()
    bw = kde_bandwidth_km(x, 1.0)
    # the clusters' angular sds are 1/√κ ≈ 164 to 712 km; the global spread is thousands of km
    assert 100.0 < bw < 700.0
    assert kde_bandwidth_km(x, 10.0) == pytest.approx(math.radians(10.0) * EARTH_RADIUS_KM)
    with pytest.raises(ValueError, match="not both"):
        density_grid_kde(x, 3.0, bandwidth_km=100.0, kappa=5.0)
    with pytest.raises(ValueError, match="finite"):
        density_grid_kde(np.full((4, 3), np.nan), 3.0)


def test_regional_grid_holds_the_probability_inside_its_extent():
    lats, lons = latlon_grid(1.0, (-10.0, 15.5, 40.0, 52.0))
    assert lats[0] == pytest.approx(40.5) and lons[-1] == pytest.approx(15.5 - 25.5 / 26 / 2) and len(lons) == 26
    with pytest.raises(ValueError, match="extent"):
        latlon_grid(1.0, (10.0, -10.0, 0.0, 5.0))
    # a northern hemisphere has half the mass of a uniform density; a cap around a vMF mean nearly all of it
    x = latlon_to_xyz(torch.tensor([[45.0, 2.0]], dtype=torch.float64)).numpy()
    north = density_grid_kde(np.r_[x, -x], 2.0, kappa=1e-3, extent=(-180.0, 180.0, 0.0, 90.0))
    assert grid_mass(north) == pytest.approx(0.5, abs=0.01)
    cap = density_grid_kde(x, 0.5, bandwidth_km=200.0, extent=(-13.0, 17.0, 37.5, 52.5))
    assert grid_mass(cap) == pytest.approx(1.0, abs=0.01)


def test_hdr_extent_zooms_on_concentrated_densities_only():
    x = _mixture_samples(2048, seed=2).numpy()
    paris = x[np.argmax(x @ latlon_to_xyz(torch.tensor([48.8, 2.3], dtype=torch.float64)).numpy())][None]
    grid = density_grid_kde(paris, 1.0, bandwidth_km=150.0)
    lon0, lon1, lat0, lat1 = hdr_extent(grid, include=[(41.9, 12.5)])  # + Rome
    assert lon0 < 2.3 < lon1 and lat0 < 48.8 < lat1 and lon0 < 12.5 < lon1 and lat0 < 41.9 < lat1
    assert lon1 - lon0 == pytest.approx(2 * (lat1 - lat0)) and 24.0 <= lon1 - lon0 < 60.0
    assert -180 <= lon0 and lon1 <= 180 and -90 <= lat0 and lat1 <= 90
    assert hdr_extent(density_grid_kde(x, 3.0)) is None  # Paris, New York and Sydney: the world
    assert hdr_extent(grid, include=[(-33.9, 151.2)]) is None  # the truth on the other side of the world
    pole = density_grid_kde(np.array([[0.0, 0.0, 1.0]]), 1.0, bandwidth_km=300.0)
    assert hdr_extent(pole) is None  # a polar cap spans every longitude


class _UniformLike:
    """Stand-in method: uniform density −ln 4π whatever the condition."""

    space = "sphere"

    def __init__(self):
        self.calls = []

    def log_likelihood(self, model, x, cond, *, rtol, atol, guidance=0.0, method="dopri5"):
        self.calls.append((x.shape[0], cond.shape))
        return torch.full(x.shape[:1], LOG_UNIFORM_SPHERE, dtype=x.dtype)


class _VMFLike:
    """Stand-in method: vMF around cond[:3] with concentration cond[3] (closed-form log-likelihood)."""

    name = "vmf-like"
    space = "sphere"

    def log_likelihood(self, model, x, cond, *, rtol, atol, guidance=0.0, method="dopri5"):
        return vmf_log_density(x, cond[:, :3], cond[:, 3])

    def sample(self, model, cond, n, *, generator=None, **kw):  # Wood draws: the HDR region of the map's GeoJSON
        return sample_vmf_mixture(cond[:, None, :3], cond[:, 3:4], torch.ones_like(cond[:, 3:4]), n, generator=generator)


def test_loglik_grid_of_a_uniform_method_is_flat_and_batched():
    method = _UniformLike()
    grid = density_grid_loglik(method, torch.nn.Linear(2, 2), np.zeros(5), 6.0, chunk=500)
    assert grid.logp.shape == (30, 60)
    np.testing.assert_allclose(grid.logp, -math.log(4 * math.pi), rtol=0, atol=1e-6)
    assert [n for n, _ in method.calls] == [500, 500, 500, 300]
    assert all(shape == (n, 5) for n, shape in method.calls)
    assert grid_mass(grid) == pytest.approx(1.0, abs=1e-3)


def test_loglik_grid_peaks_at_the_conditioned_direction():
    mu = latlon_to_xyz(torch.tensor([-31.5, 25.5], dtype=torch.float64)).numpy()
    grid = density_grid_loglik(_VMFLike(), torch.nn.Linear(1, 1).double(), np.r_[mu, 50.0], 3.0)
    i, j = np.unravel_index(np.argmax(grid.logp), grid.logp.shape)
    assert (grid.lats[i], grid.lons[j]) == (-31.5, 25.5)
    assert grid_mass(grid) == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------- outline and rendering


def test_bundled_outline_is_plausible():
    outline = load_outline()
    coast, borders = outline["coastline"], outline["borders"]
    assert len(coast) > 200 and len(borders) > 100
    pts = np.concatenate(coast + borders)
    assert pts.shape[1] == 2 and np.abs(pts[:, 0]).max() <= 180 and np.abs(pts[:, 1]).max() <= 90
    # Antarctica's closing edge along the pole line was dropped: no coastline segment runs along −90°
    assert not any(((line[:-1, 1] < -89.9) & (line[1:, 1] < -89.9)).any() for line in coast)


def _write_polygon_shapefile(path, rings):
    recs = b""
    for i, ring in enumerate(rings):
        pts = b"".join(struct.pack("<2d", *p) for p in ring)
        body = struct.pack("<i4d2i", 5, 0, 0, 0, 0, 1, len(ring)) + struct.pack("<i", 0) + pts
        recs += struct.pack(">2i", i + 1, len(body) // 2) + body
    header = struct.pack(">7i", 9994, 0, 0, 0, 0, 0, (100 + len(recs)) // 2) + struct.pack("<2i8d", 1000, 5, *[0.0] * 8)
    path.write_bytes(header + recs)


def test_outline_derivation_splits_coast_from_shared_borders(tmp_path):
    shp = tmp_path / "two.shp"
    west = [(0, 0), (0, 10), (10, 10), (10, 0), (0, 0)]
    east = [(10, 0), (10, 10), (20, 10), (20, 0), (10, 0)]
    _write_polygon_shapefile(shp, [west, east])
    doc = outline_from_shapefile(str(shp))

    def edges(lines):
        out = []
        for line in lines:
            pts = list(zip(line[0::2], line[1::2]))
            out += [frozenset(e) for e in zip(pts[:-1], pts[1:])]
        return out

    c = lambda *p: tuple(v * 100 for v in p)  # noqa: E731  (hundredths of a degree)
    assert edges(doc["borders"]) == [frozenset({c(10, 0), c(10, 10)})]
    expected = {frozenset(e) for ring in (west, east) for e in zip(ring[:-1], ring[1:])} - {frozenset({(10, 0), (10, 10)})}
    coast = edges(doc["coastline"])
    assert len(coast) == len(set(coast)) == 6
    assert set(coast) == {frozenset(c(*p) for p in e) for e in expected}
    assert "public domain" in doc["licence"]


def test_render_density_map_writes_png_of_expected_size(tmp_path):
    grid = density_grid_kde(_mixture_samples(512).numpy(), 3.0, bandwidth_km=400.0)
    out = render_density_map(tmp_path / "m.png", *grid, true_latlon=(45.0, 5.0), pred_latlon=(48.8, 2.3),
                             title="test", figsize=(8.0, 4.5), dpi=100)
    assert _png_size(out) == (800, 450)
    bare = render_density_map(tmp_path / "bare.png", *grid, dpi=50)  # no markers, no title
    assert _png_size(bare) == (550, 285)
    with pytest.raises(ValueError, match="shape"):
        render_density_map(tmp_path / "x.png", grid.lats, grid.lons, grid.logp[:, :-1])
    with pytest.raises(ValueError, match="finite"):
        render_density_map(tmp_path / "x.png", grid.lats, grid.lons, np.full_like(grid.logp, -np.inf))


def test_render_calibration_plot_one_or_several_models(tmp_path):
    one = render_calibration_plot(tmp_path / "one.png", LEVELS, [p * 0.9 for p in LEVELS], 0.05, "rfm", dpi=50)
    several = render_calibration_plot(tmp_path / "two.png", LEVELS, [[p * 0.9 for p in LEVELS], LEVELS], [0.05, None],
                                      ["rfm", "vmf"], dpi=50)
    (w1, h1), (w2, h2) = _png_size(one), _png_size(several)
    assert w1 == w2 == 320 and h1 == 326 and h2 == 337  # the legend below the axes grows by rows of two
    with pytest.raises(ValueError, match="matching"):
        render_calibration_plot(tmp_path / "bad.png", LEVELS, [LEVELS, LEVELS], [0.0, 0.0], ["only one"])


# --------------------------------------------------------------------------- stage: calibration plot


def test_run_calibration_plot_from_report(tmp_path):
    from geopipe.stages.maps import CalibrationPlotConfig, run_calibration_plot

    cal = lambda s: {"n": 10, "levels": LEVELS, "coverage": [min(1.0, p * s) for p in LEVELS], "error": 0.1}  # noqa: E731
    doc = {"schema": REPORT_SCHEMA_ID, "version": "t", "comparison": [], "notes": [],
           "reports": [{"name": "a", "calibration": cal(0.8)}, {"name": "b", "calibration": cal(1.2)},
                       {"name": "baseline", "calibration": None}]}
    report = tmp_path / "report.json"
    report.write_text(json.dumps(doc))
    res = run_calibration_plot(CalibrationPlotConfig(str(report), str(tmp_path / "plots" / "cal.png")))
    assert res.names == ("a", "b") and _png_size(res.out)[0] > 0
    doc["reports"] = doc["reports"][2:]
    report.write_text(json.dumps(doc))
    with pytest.raises(GeopipeError, match="no calibration section"):
        run_calibration_plot(CalibrationPlotConfig(str(report), str(tmp_path / "c.png")))
    report.write_text("{}")
    with pytest.raises(GeopipeError, match="not a geopipe evaluation report"):
        run_calibration_plot(CalibrationPlotConfig(str(report), str(tmp_path / "c.png")))


def test_map_config_validation():
    from geopipe.stages.maps import MapConfig

    with pytest.raises(ValueError, match="choose one of"):
        MapConfig("c", "s", "o", mode="heat")
    with pytest.raises(ValueError, match="resolution_deg"):
        MapConfig("c", "s", "o", resolution_deg=7.0)
    with pytest.raises(ValueError, match="kde_samples"):
        MapConfig("c", "s", "o", kde_samples=1)
    assert MapConfig("c", "s", "o", keys=["a", "b"]).keys == ("a", "b")


# --------------------------------------------------------------------------- stage end to end (untrained models)

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 8, "preprocess": {"size": 8}, "fingerprint": "abc"}


def _tiny_store(path, n: int = 5):
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(0)
    latlon = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)])
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=8, dtype="float32", normalize=True, created_by={"version": "t"}) as w:
        w.append_shard("a.tar", rng.normal(size=(n, 8)), latlon, [f"rec/{i}" for i in range(n)], {}, [], ShardStat(1, 0.0))
    return str(path), latlon


def _untrained_checkpoint(path, name: str) -> str:
    from geopipe.pipeline.artifacts.checkpoint import save_checkpoint
    from geopipe.pipeline.methods.registry import get_method
    from geopipe.pipeline.model.network import NetworkConfig

    method = get_method(name)
    net = NetworkConfig(input_dim=3, dim=16, depth=2, expansion=2, cond_dim=8)
    torch.manual_seed(0)
    model = method.build_model(net)
    config = {"method": method.to_dict(), "network": net.to_dict(), "embed_dim": 8, "backbone": IDENTITY, "step": 0}
    save_checkpoint(path, model_state=model.state_dict(), config=config)
    return str(path)


@pytest.mark.parametrize("name,mode,res,keys", [("rfm", "loglik", 30.0, ("rec/3",)), ("rfm", "kde", 15.0, ("rec/3", "rec/0")),
                                                ("vmf_mixture", "loglik", 10.0, ("rec/3", "rec/0"))])
def test_run_maps_end_to_end(tmp_path, name, mode, res, keys):
    from geopipe.stages.maps import MapConfig, run_maps

    store, latlon = _tiny_store(tmp_path / "s.zarr")
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", name)
    cfg = MapConfig(ckpt, store, str(tmp_path / "maps"), keys=keys, mode=mode, resolution_deg=res,
                    kde_samples=64, steps=4, rtol=1e-2, atol=1e-2, device="cpu")
    out = run_maps(cfg)
    assert out.keys == keys
    assert [p.rsplit("/", 1)[-1] for p in out.paths] == [f"map-{k.replace('/', '_')}.png" for k in keys]
    assert all(_png_size(p) == (1650, 855) for p in out.paths)
    # exact sphere densities and KDEs integrate to 1, up to the quadrature error of a coarse grid
    # (≈ 7 % at 30° for this untrained rfm, whose density varies by a factor ≈ 35 over the sphere)
    assert out.masses == pytest.approx([1.0] * len(keys), abs=0.1)


def _stub_predictor(method):
    from geopipe.pipeline.infer.predictor import Predictor
    from geopipe.pipeline.model.conditioning import CondStats

    return Predictor(method, torch.nn.Linear(1, 1).double(), {}, torch.device("cpu"), cond_stats=CondStats.identity(4))


def test_r3_densities_are_restricted_to_the_sphere_and_renormalised():
    from geopipe.stages.maps import MapConfig, _density

    class R3Like(_VMFLike):
        space = "r3"

        def log_likelihood(self, model, x, cond, **kw):  # a Gaussian-like R³ density, not normalised on S²
            return super().log_likelihood(model, x, cond, **kw) - 5.0

    p = _stub_predictor(R3Like())
    cond = torch.tensor([[0.0, 0.0, 1.0, 20.0]], dtype=torch.float64)
    grid, caption = _density(MapConfig("c", "s", "o", resolution_deg=5.0), p, cond, torch.Generator())
    assert grid_mass(grid) == pytest.approx(1.0, abs=1e-9) and "renormalised" in caption


def test_run_maps_selects_first_records_and_names_unknown_keys(tmp_path):
    from geopipe.stages.maps import MapConfig, run_maps

    store, _ = _tiny_store(tmp_path / "s.zarr")
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", "vmf")
    res = run_maps(MapConfig(ckpt, store, str(tmp_path / "m"), n_records=2, resolution_deg=30.0, device="cpu"))
    assert res.keys == ("rec/0", "rec/1")
    with pytest.raises(GeopipeError, match=r"'nope' is not in store .* \(5 keys"):
        run_maps(MapConfig(ckpt, store, str(tmp_path / "m"), keys=("nope",), device="cpu"))


def test_cli_commands(tmp_path):
    from click.testing import CliRunner

    from geopipe.flows.cli_maps import calibration_plot_command, map_command

    store, _ = _tiny_store(tmp_path / "s.zarr")
    ckpt = _untrained_checkpoint(tmp_path / "ckpt", "vmf")
    runner = CliRunner()
    ok = runner.invoke(map_command, ["-c", ckpt, "--store", store, "-o", str(tmp_path / "m"), "--key", "rec/1", "--resolution", "30", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    assert "rec/1:" in ok.output and (tmp_path / "m" / "map-rec_1.png").is_file()
    bad = runner.invoke(map_command, ["-c", ckpt, "--store", store, "-o", str(tmp_path / "m"), "--key", "zz", "--device", "cpu"])
    assert bad.exit_code == 1 and "geopipe: error: key 'zz' is not in store" in bad.output
    missing = runner.invoke(calibration_plot_command, [str(tmp_path / "none.json"), "-o", str(tmp_path / "c.png")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_maps_stage_zooms_on_a_concentrated_density(tmp_path, monkeypatch):
    import geopipe.stages.maps as stage

    seen = {}
    monkeypatch.setattr(stage, "render_density_map", lambda path, *grid, **kw: seen.update(kw, grid=grid) or path)
    p = _stub_predictor(_VMFLike())
    mu = latlon_to_xyz(torch.tensor([-23.5, -46.6], dtype=torch.float64))  # São Paulo
    cond = torch.cat([mu, torch.tensor([3000.0], dtype=torch.float64)])[None]
    cfg = stage.MapConfig("c", "s", str(tmp_path), mode="loglik", resolution_deg=3.0)
    path, mass, *_ = stage._draw_record(cfg, p, cond, torch.Generator(), "a/b", (-22.9, -43.2), (-23.5, -46.6))
    assert path.endswith("map-a_b.png") and mass == pytest.approx(1.0, abs=0.02)
    lon0, lon1, lat0, lat1 = seen["extent"]
    assert lon0 < -46.6 < lon1 and lat0 < -23.5 < lat1 and lon1 - lon0 < 60
    lats, lons, logp = seen["grid"]
    assert logp.shape == (60, 120) and lons[0] > lon0 and lons[-1] < lon1  # a regional grid as fine as the world one
    assert "view holds" in seen["title"]
    world = stage._draw_record(stage.MapConfig("c", "s", str(tmp_path), zoom=False), p, cond, torch.Generator(), "k", None, None)
    assert world[0].endswith("map-k.png") and seen["extent"] is None

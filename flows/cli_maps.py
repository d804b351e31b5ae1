"""``geopipe map`` and ``geopipe calibration-plot``: the picture commands.

Registered on the main group in :mod:`geopipe.flows.cli` with ``cli.add_command(map_command)`` and
``cli.add_command(calibration_plot_command)``. Heavy imports (torch, matplotlib) happen inside
the commands so ``geopipe --help`` stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import progress_enabled, user_errors

__all__ = ["map_command", "calibration_plot_command"]


@click.command("map")
@click.option("--checkpoint", "-c", required=True, help="Checkpoint directory.")
@click.option("--store", required=True, help="Embedding store holding the records.")
@click.option("--out-dir", "--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for map-<key>.png, map-<key>.tif (GeoTIFF, probability per km²) and map-<key>.geojson (HDR region).")
@click.option("--overwrite", is_flag=True, help="Replace the files of an earlier map of the same records in --out-dir.")
@click.option("--key", "keys", multiple=True, help="Record key to draw (repeat); default: the first --n-records records.")
@click.option("--n-records", "--n", "n_records", default=4, show_default=True, help="Records to draw when no --key is given.")
@click.option("--mode", type=click.Choice(["auto", "loglik", "kde"]), default="auto", show_default=True,
              help="Density: exact log-likelihood on the grid (an ODE per cell: a GPU job), or a KDE of model samples; "
                   "auto = kde on a CPU, loglik on a GPU.")
@click.option("--resolution", "resolution_deg", default=3.0, show_default=True, help="Grid cell size in degrees (divides 180).")
@click.option("--kde-samples", default=2048, show_default=True, help="Model samples for --mode kde.")
@click.option("--bandwidth-km", default=None, type=float, help="KDE kernel width in km (default: k-nearest-neighbour rule).")
@click.option("--steps", default=16, show_default=True, help="Sampler steps.")
@click.option("--guidance", default=2.0, show_default=True, help="Guidance of the point prediction.")
@click.option("--seed", default=3407, show_default=True, help="Random seed of the sampling noise.")
@click.option("--rtol", default=1e-4, show_default=True, help="ODE tolerance of the exact likelihood.")
@click.option("--atol", default=1e-4, show_default=True, help="Absolute ODE tolerance of the exact likelihood.")
@click.option("--world", is_flag=True, help="Always draw the whole world (no zoom on the high-density region).")
@click.option("--region", default=0.9, show_default=True, type=float,
              help="Probability mass q of the highest-density region written as map-<key>.geojson (0 = none).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@user_errors
def map_command(checkpoint, store, out_dir, overwrite, keys, n_records, mode, resolution_deg, kde_samples, bandwidth_km, steps, guidance,
                seed, rtol, atol, world, region, device):
    """Draw world maps (PNG) of the predicted density, true location and prediction for chosen records, with the
    density grid as GeoTIFF and its highest-density region as GeoJSON beside each."""
    from geopipe.stages.maps import MapConfig, run_maps

    cfg = MapConfig(checkpoint=checkpoint, store=store, out_dir=out_dir, keys=tuple(keys), n_records=n_records, mode=mode,
                    resolution_deg=resolution_deg, kde_samples=kde_samples, bandwidth_km=bandwidth_km, steps=steps,
                    guidance=guidance, seed=seed, rtol=rtol, atol=atol, zoom=not world, device=device,
                    progress=progress_enabled(), region=None if region == 0 else region, overwrite=overwrite)
    res = run_maps(cfg)
    for key, path, mass, raster, geojson in zip(res.keys, res.paths, res.masses, res.rasters, res.regions):
        click.echo(f"{key}: {path} (grid mass {mass:.3f}), {raster}" + (f", {geojson}" if geojson else ""))


@click.command("calibration-plot")
@click.argument("report", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, help="PNG file to write.")
@click.option("--title", default="HDR calibration", show_default=True, help="Figure title.")
@user_errors
def calibration_plot_command(report, out, title):
    """Plot HDR calibration (coverage against probability level) of an evaluate REPORT JSON."""
    from geopipe.stages.maps import CalibrationPlotConfig, run_calibration_plot

    res = run_calibration_plot(CalibrationPlotConfig(report_json=report, out=out, title=title))
    click.echo(f"calibration of {len(res.names)} model(s) → {res.out}")

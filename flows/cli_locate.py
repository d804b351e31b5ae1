"""``geopipe locate``: photos in, where they were taken out (GeoParquet + a short table).

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the command.
"""

from __future__ import annotations

import math

import click

from geopipe.flows.cli_common import device_option, progress_enabled, user_errors

__all__ = ["locate_command", "format_table"]


@click.command("locate")
@click.argument("photos", nargs=-1, required=True)
@click.option("--model", "--checkpoint", "-c", "model", required=True,
              help="Checkpoint directory of `geopipe train`, a PLONK model directory, or hf-hub:org/name "
                   "(e.g. hf-hub:nicolas-dufour/PLONK_YFCC; needs internet once).")
@click.option("--out", "-o", required=True, help="Predictions: a .parquet file (GeoParquet), or a dataset directory.")
@click.option("--store", default=None, help="Embedding store kept for reruns (default: OUT without .parquet + .zarr).")
@click.option("--region", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Add each photo's highest-density region of this probability mass (e.g. 0.9) as a polygon column.")
@click.option("--region-density", type=click.Choice(["auto", "exact", "kde"]), default="auto", show_default=True,
              help="Density of the region: the model's own (exact; ODE solves for flows, minutes per photo on a CPU) or a KDE of "
                   "1000 draws; auto = exact for vmf/vmf_mixture, kde for flows.")
@click.option("--samples", default=0, show_default=True, help="Unguided samples per photo, stored as lists.")
@click.option("--localizability", default=0, show_default=True,
              help="Monte-Carlo samples for the entropy and effective area (0 = off; exact ODE solves for flow models).")
@click.option("--steps", default=16, show_default=True, help="Sampler steps.")
@click.option("--guidance", default=2.0, show_default=True, help="Guidance scale of the point prediction.")
@click.option("--seed", default=3407, show_default=True, help="Random seed of the sampling noise.")
@click.option("--batch-size", default=256, show_default=True, help="Records per model batch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.")
@click.option("--dask", "dask_address", default=None, help="'local:N' or a scheduler address: embed and predict on a Dask cluster.")
@device_option
@user_errors
def locate_command(photos, model, out, store, region, region_density, samples, localizability, steps, guidance, seed, batch_size, overwrite,
                   dask_address, device):
    """Geolocate PHOTOS (image files, folders, globs, WebDataset tars): where was each taken?

    Embeds them with the model's own backbone, samples each photo's location distribution and
    writes GeoParquet (point, samples, localizability, region); prints a table of the first rows
    and every file it could not read.
    """
    from geopipe.flows.locate import LocateConfig, run_locate

    cfg = LocateConfig(model=model, inputs=tuple(photos), out=out, store=store, region=region, region_density=region_density, samples=samples,
                       localizability=localizability, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size,
                       overwrite=overwrite, dask=dask_address, device=device, progress=progress_enabled())
    res = run_locate(cfg)
    click.echo(format_table(res))
    for key, shard, reason, detail in res.rejects:
        click.echo(f"not located: {key or shard}: {reason} ({detail})", err=True)
    click.echo(f"locate → {res.out}: {res.n_located} photo(s) located, {res.n_rejected} unreadable; "
               f"embeddings kept in {res.store}; {res.seconds:.1f} s", err=True)


def _place_names(rows) -> list[str] | None:
    """Nearest GeoNames place per row when the ``geocode`` extra (reverse_geocoder) is installed."""
    try:
        import reverse_geocoder
    except ImportError:
        return None
    hits = reverse_geocoder.search([(r.lat, r.lon) for r in rows], mode=1, verbose=False) if rows else []
    return [", ".join(x for x in (h.get("name"), h.get("admin1"), h.get("cc")) if x) for h in hits]


def _km2(v) -> str:
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"


def format_table(res) -> str:
    """Text table of the first located photos: key, lat, lon, [place], effective area, region area."""
    places = _place_names(res.rows)
    head = ["photo", "lat", "lon"] + (["place"] if places else []) + ["eff. area km²", "region km²"]
    lines = []
    for i, r in enumerate(res.rows):
        cells = [r.key, f"{r.lat:.4f}", f"{r.lon:.4f}"] + ([places[i]] if places else []) + [_km2(r.effective_area_km2), _km2(r.region_area_km2)]
        lines.append(cells)
    widths = [max(len(h), *(len(c[j]) for c in lines)) if lines else len(h) for j, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    text = [fmt(head)] + [fmt(c) for c in lines]
    if res.n_located > len(res.rows):
        text.append(f"... {res.n_located - len(res.rows)} more in {res.out}")
    return "\n".join(text)

"""``geopipe demo-data`` (write the offline demo world) and ``geopipe demo`` (the whole flow on
it, both branches, printing the three tables).

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the
commands so ``geopipe --help`` stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import pipeline_progress, progress_enabled, user_errors

__all__ = ["demo_data_command", "demo_command"]


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--world", type=click.Choice(["images", "geoclip"]), default="images", show_default=True,
              help="images: WebDataset shards of synthetic photos (extract them first); geoclip: embedding stores at GeoCLIP's "
                   "100K real photo locations, made from its location encoder (OUT/{train,val,test,heldout}.zarr; needs "
                   "pip install 'geopipe-geolocation[geoclip]'; docs/geoclip_world.md).")
@click.option("--n-train", type=int, default=None, help="Training records [default: 3000 images, 20000 geoclip].")
@click.option("--n-test", type=int, default=None, help="Test records [default: 500 images, 2000 geoclip].")
@click.option("--n-val", type=int, default=None, help="geoclip: validation records [default: 2000].")
@click.option("--n-heldout", type=int, default=None, help="geoclip: records of the held-out region (New Zealand) [default: 500].")
@click.option("--shard-size", default=500, show_default=True, help="images: samples per WebDataset tar.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the generated world.")
@click.option("--views-per-place", default=1, show_default=True,
              help="images: photos per place (> 1: headings and capture ids, so BayesCap finds viewpoint pairs).")
@click.option("--test-views-per-place", type=int, default=None, help="images: the test split's photos per place [default: --views-per-place].")
@user_errors
def demo_data_command(out, world, n_train, n_test, n_val, n_heldout, shard_size, seed, views_per_place, test_views_per_place):
    """Write an offline demo world to OUT: synthetic photos (--world images) or realistic embedding stores (--world geoclip)."""
    sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test), ("n_val", n_val), ("n_heldout", n_heldout)) if v is not None}
    if world == "geoclip":
        _geoclip_world(out, sizes, seed)
        return
    if "n_val" in sizes or "n_heldout" in sizes:
        raise click.UsageError("--n-val and --n-heldout belong to --world geoclip")
    from geopipe.stages.demo import DemoDataConfig, run_demo_data

    res = run_demo_data(DemoDataConfig(out=out, shard_size=shard_size, seed=seed, views_per_place=views_per_place,
                                       test_views_per_place=test_views_per_place, **sizes))
    click.echo(f"wrote {res.n_train} train and {res.n_test} test samples in {len(res.shards)} shards to {out}")


def _geoclip_world(out: str, sizes: dict, seed: int) -> None:
    from geopipe.pipeline.world.geoclip import GeoclipWorldConfig
    from geopipe.stages.demo_geoclip import GeoclipDataConfig, run_geoclip_data

    res = run_geoclip_data(GeoclipDataConfig(out=out, world=GeoclipWorldConfig(seed=seed, **sizes), progress=progress_enabled()))
    counts = ", ".join(f"{n} {s}" for s, n in res.counts.items())
    how = "already there" if res.skipped else f"{res.encoded} gallery points encoded, {res.seconds:.0f} s"
    click.echo(f"geoclip world ({how}): {counts} records in {', '.join(res.stores.values())}")
    click.echo(f"backbone: {res.label}")


@click.command("demo")
@click.option("--workdir", default="data/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the demo world, stores, model and outputs.")
@click.option("--steps", default=3000, show_default=True, help="Training steps (CPU-sized).")
@user_errors
def demo_command(workdir, steps):
    """Generate the offline demo world and run the full flow on it, printing the evaluation table."""
    import torch

    from geopipe.flows.pipeline_flow import run_pipeline
    from geopipe.stages.config import demo_pipeline_config

    # The demo's networks are tiny: one intra-op thread is as fast as two on an idle 2-core
    # machine and ~5× faster on a loaded one (OpenMP threads spin-wait for busy cores).
    if click.get_current_context().find_root().params.get("threads") is None:
        torch.set_num_threads(1)
    cfg = demo_pipeline_config(workdir, train_steps=steps)
    result = run_pipeline(pipeline_progress(cfg))
    click.echo(result.table)
    unc = result.uncertainty
    if unc is not None and unc.table:
        click.echo(f"\nRetrieval beside the generative model ({workdir}/retrieval.parquet, {workdir}/predictions.parquet):\n{unc.table}")
    if unc is not None and unc.uncertainty_table:
        click.echo(f"\nFailure prediction (error > {cfg.uncertainty.evaluate.failure_km:g} km), one row per score; "
                   f"plots in {cfg.uncertainty.evaluate.plots_dir}:\n{unc.uncertainty_table}")
    _locate_demo_photos(workdir, cfg)


def _locate_demo_photos(workdir: str, cfg) -> None:
    """The job geopipe exists for, on the demo: eight test photos with their coordinates stripped
    (plain JPEG files in WORKDIR/photos) → ``geopipe locate`` with the demo model → GeoParquet."""
    import os

    from geopipe.flows.cli_common import progress_enabled
    from geopipe.flows.cli_locate import format_table
    from geopipe.flows.locate import LocateConfig, LocateResult, default_store, located_rows, run_locate
    from geopipe.stages.demo import write_demo_photos

    photos = os.path.join(workdir, "photos")
    test = next(e for e in cfg.extract if e.store == cfg.predict.store)  # the test split's shards
    write_demo_photos(test.shards[0], photos, n=8)
    out = os.path.join(workdir, "located.parquet")
    model_saved = os.path.getmtime(os.path.join(cfg.train.out, "config.json"))
    if os.path.exists(out) and os.path.getmtime(out) > model_saved:  # located by this model already: never redo finished work
        n, rows = located_rows(out)
        res = LocateResult(out, default_store(out), n, 0, rows, (), 0.0)
    else:
        res = run_locate(LocateConfig(model=cfg.train.out, inputs=(photos,), out=out, region=0.9, overwrite=True, device="cpu",
                                      progress=progress_enabled()))
    click.echo(f"\nUnlabelled photos located (geopipe locate -c {cfg.train.out} {photos} -o {out} --region 0.9):\n{format_table(res)}")

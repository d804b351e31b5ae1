"""``geopipe demo-data`` (write the offline demo world) and ``geopipe demo`` (the whole flow on
it, both branches, printing the three tables).

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the
commands so ``geopipe --help`` stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import pipeline_progress, user_errors

__all__ = ["demo_data_command", "demo_command"]


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n-train", default=3000, show_default=True, help="Training photos to generate.")
@click.option("--n-test", default=500, show_default=True, help="Test photos to generate.")
@click.option("--shard-size", default=500, show_default=True, help="Samples per WebDataset tar.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the generated world.")
@click.option("--views-per-place", default=1, show_default=True,
              help="Photos per place (> 1: headings and capture ids, so BayesCap finds viewpoint pairs).")
@click.option("--test-views-per-place", type=int, default=None, help="The test split's photos per place [default: --views-per-place].")
@user_errors
def demo_data_command(out, n_train, n_test, shard_size, seed, views_per_place, test_views_per_place):
    """Write the offline demo world (WebDataset shards of synthetic geotagged photos) to OUT."""
    from geopipe.stages.demo import DemoDataConfig, run_demo_data

    res = run_demo_data(DemoDataConfig(out=out, n_train=n_train, n_test=n_test, shard_size=shard_size, seed=seed,
                                       views_per_place=views_per_place, test_views_per_place=test_views_per_place))
    click.echo(f"wrote {res.n_train} train and {res.n_test} test samples in {len(res.shards)} shards to {out}")


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
    click.echo(result["table"])
    unc = result.get("uncertainty") or {}
    if unc.get("table"):
        click.echo(f"\nRetrieval beside the generative model ({workdir}/retrieval.parquet, {workdir}/predictions.parquet):\n{unc['table']}")
    if unc.get("uncertainty_table"):
        click.echo(f"\nFailure prediction (error > {cfg.uncertainty.evaluate.failure_km:g} km), one row per score; "
                   f"plots in {cfg.uncertainty.evaluate.plots_dir}:\n{unc['uncertainty_table']}")

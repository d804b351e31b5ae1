"""``geopipe run`` and ``geopipe serve``: the Prefect flow of the whole pipeline, once or on a schedule.

Registered on the main group in :mod:`geopipe.flows.cli` with ``cli.add_command(run_command)`` and
``cli.add_command(serve_command)``. Prefect is imported inside the commands so ``geopipe --help``
stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import pipeline_progress, user_errors

__all__ = ["run_command", "serve_command"]


@click.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--debug", is_flag=True, help="Print the full traceback of a failing stage (otherwise one line naming the flow run).")
@user_errors
def run_command(config, debug):
    """Run the whole pipeline flow (extract → train → predict → evaluate) from a TOML CONFIG with Prefect.

    CONFIG layout: a section's keys are its command's option names with underscores (--no-X is
    X = false; a few options without a flag keep their field names); unknown keys and wrong types
    are one-line errors. [train],
    [predict] and [evaluate] come together; the optional [uncertainty.*] tables add (or, alone,
    are) the branch retrieve → BayesCap → score → evaluate --uncertainty on the same stores; steps
    whose stores and options are unchanged since the last successful run are skipped:

    \b
        workdir = "data/run"                # optional
        [demo_data]                         # optional: write the offline demo world first
        out = "data/run/shards"
        [extract.train]                     # one table per store to extract
        shards = ["data/run/shards/train-{000000..000005}.tar"]
        store = "data/run/train.zarr"
        [extract.test]
        shards = ["data/run/shards/test-000000.tar"]
        store = "data/run/test.zarr"
        [train]
        store = "data/run/train.zarr"
        out = "data/run/model"
        steps = 3000
        [predict]
        checkpoint = "data/run/model"
        store = "data/run/test.zarr"
        out = "data/run/predictions.parquet"
        nll = true
        [evaluate]
        predictions = ["data/run/predictions.parquet"]
        baseline_store = "data/run/train.zarr"  # optional: constant-prediction row
        [uncertainty.retrieve]              # optional: geopipe retrieve options
        query = "data/run/test.zarr"
        database = "data/run/train.zarr"
        out = "data/run/retrieval.parquet"
        mode = "kernel"
        [uncertainty.bayescap]              # optional: pairs + BayesCap on the database
        store = "data/run/train.zarr"
        out = "data/run/bayescap"
        min_pairs = 500
        no_pairs_policy = "skip"            # too few pairs: training-free scores only
        [uncertainty.evaluate]              # optional: evaluate --uncertainty options
        failure_km = 200
        plots = "data/run/plots"
    """
    from geopipe.flows.pipeline_flow import run_pipeline
    from geopipe.stages.config import load_pipeline_config

    result = run_pipeline(pipeline_progress(load_pipeline_config(config)), debug=debug)
    if result.table is not None:
        click.echo(result.table)
    unc = result.uncertainty
    if unc is not None:
        if (unc.bayescap or {}).get("status", "trained") != "trained":
            click.echo(f"bayescap: {unc.bayescap['message']}")
        click.echo(unc.table + "\n\n" + unc.uncertainty_table)


@click.command("serve")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--cron", default=None, help="Cron schedule, e.g. '0 3 * * *' (nightly at 03:00).")
@click.option("--interval", type=float, default=None, help="Seconds between runs.")
@click.option("--name", default=None, help="Deployment name (default: geopipe-<config stem>).")
@user_errors
def serve_command(config, cron, interval, name):
    """Serve the pipeline for CONFIG on a schedule (re-runs pick up new shards incrementally and
    skip train/predict/evaluate when nothing changed). Uses the Prefect server of PREFECT_API_URL,
    or starts `prefect server start` (with its scheduler) on a free local port while serving."""
    from geopipe.flows.serve import check_schedule, scheduling_api
    from geopipe.stages.config import load_pipeline_config

    check_schedule(cron, interval)  # before anything starts: the schedule, then the config, then a server
    load_pipeline_config(config)
    with scheduling_api(lambda line: click.echo(line, err=True)):  # stops a server it started on exit (Ctrl-C, SIGTERM)
        from prefect import serve as prefect_serve  # after the API url is set: Prefect reads it at import

        from geopipe.flows.pipeline_flow import scheduled_deployment
        from geopipe.flows.tasks import prefect_defaults

        try:
            with prefect_defaults():
                prefect_serve(scheduled_deployment(config, cron=cron, interval_s=interval, name=name))
        except KeyboardInterrupt:
            pass
        finally:
            _unschedule(config, name)
            click.echo("geopipe serve: stopped", err=True)


def _unschedule(config: str, name: str | None) -> None:
    """On stop: the deployment paused and its runs still SCHEDULED deleted (one line says how many)."""
    from geopipe.flows.pipeline_flow import deployment_name, scheduled_flow
    from geopipe.flows.serve import remove_scheduled_runs

    try:
        n = remove_scheduled_runs(scheduled_flow.name, deployment_name(config, name))
    except Exception as exc:  # the server may be gone already: say so, never hide why serve stopped
        click.echo(f"geopipe serve: could not remove the scheduled runs ({type(exc).__name__}: {exc})", err=True)
        return
    click.echo(f"geopipe serve: removed {n} scheduled run(s) and paused deployment {deployment_name(config, name)}", err=True)

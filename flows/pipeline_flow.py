"""Prefect flow chaining the stages: (demo data) → extract → train → predict → evaluate, and
the uncertainty branch (retrieve → BayesCap → score → evaluate, :mod:`geopipe.flows.uncertainty_flow`).

The tasks are in :mod:`geopipe.flows.tasks` (thin wrappers around the stage functions).
Extraction is resumable at shard level by the stage itself (completion records in the
store), so a retried or re-run flow only embeds new shards. Runs on Prefect's ephemeral local
server (SQLite) with no setup. Imports go one way: this module → uncertainty_flow → tasks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from prefect import flow, get_run_logger

from geopipe.flows.serve import check_schedule
from geopipe.flows.tasks import brief_user_errors, console_on_success, demo_data_task, evaluate_task, extract_task, predict_task, prefect_defaults, train_task
from geopipe.flows.uncertainty_flow import UncertaintyResult, run_uncertainty_branch
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.config import PipelineConfig
from geopipe.stages.evaluate import store_mean_direction

__all__ = ["PipelineResult", "geopipe_flow", "run_pipeline", "scheduled_flow", "scheduled_deployment", "deployment_name"]


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline run gives back: the generative branch's evaluation table and reports
    (None / empty without ``[train]``; the last successful run's when nothing changed), the
    stage results of the steps that ran (``extract`` a list, one per store; ``train``,
    ``predict``, ``evaluate``, ``demo_data``), why steps were skipped, and the uncertainty
    branch's result (None without ``[uncertainty]``)."""

    table: str | None = None
    reports: list = field(default_factory=list)
    results: dict = field(default_factory=dict)
    skipped: tuple[str, ...] = ()
    uncertainty: UncertaintyResult | None = None


def run_pipeline(cfg: PipelineConfig, *, debug: bool = False) -> PipelineResult:
    """:func:`geopipe_flow` under geopipe's Prefect settings; a stage's GeopipeError comes back
    as one line naming the flow run (its full trace is in the Prefect UI, or printed here with ``debug``)."""
    import traceback

    from prefect.utilities.names import generate_slug

    name = generate_slug(2)  # chosen here, so the error can name it (Prefect's own style: "witty-otter")
    try:
        with prefect_defaults(), brief_user_errors(debug), console_on_success(debug):  # a failed run: one line
            return geopipe_flow.with_options(flow_run_name=name)(cfg)
    except GeopipeError as exc:
        if debug:
            traceback.print_exception(exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GeopipeError(f"{text} (flow run {name!r}; full trace with `geopipe run --debug` or in the Prefect UI)") from None


@flow(name="geopipe", validate_parameters=False, log_prints=True)
def geopipe_flow(cfg: PipelineConfig) -> PipelineResult:
    """Run the whole pipeline (see :class:`PipelineResult`). After extraction, train/predict/evaluate
    (and the uncertainty branch's steps) run only when their inputs changed since the last
    successful run (``geopipe.stages.rerun``; ``[rerun]`` in the config)."""
    results = {}
    if cfg.demo_data is not None:
        results["demo_data"] = demo_data_task(cfg.demo_data)
    results["extract"] = [extract_task(e) for e in cfg.extract]
    out = PipelineResult(results=results)
    if cfg.train is not None:
        out = _generative_branch(cfg, results)
    if cfg.uncertainty is not None:
        out = dataclasses.replace(out, uncertainty=run_uncertainty_branch(cfg))
    return out


def _generative_branch(cfg: PipelineConfig, results: dict) -> PipelineResult:
    """train → predict → evaluate, each skipped when unchanged."""
    from geopipe.stages.rerun import plan_rerun, save_run_state

    plan = plan_rerun(cfg, cfg.rerun, cfg.baseline_store)
    for reason in plan.reasons:
        get_run_logger().info(reason)
    if plan.train is not None:
        results["train"] = train_task(plan.train)
    if plan.predict is not None:
        results["predict"] = predict_task(plan.predict)
    if not plan.evaluate:
        return PipelineResult(plan.previous["table"], plan.previous["reports"], results, tuple(plan.reasons))
    evaluate_cfg = cfg.evaluate
    if cfg.baseline_store:
        evaluate_cfg = dataclasses.replace(evaluate_cfg, baseline_latlon=store_mean_direction(cfg.baseline_store))
    ev = evaluate_task(evaluate_cfg)
    results["evaluate"] = ev
    save_run_state(cfg.workdir, plan, ev.table, ev.reports)
    return PipelineResult(ev.table, ev.reports, results, tuple(plan.reasons))


@flow(name="geopipe-scheduled", validate_parameters=True, log_prints=True)
def scheduled_flow(config_path: str) -> PipelineResult:
    """Re-read the TOML config and run the pipeline: a scheduled run picks up new shards that
    the config's patterns now match (extraction appends only shards not yet in the store).
    Served runs execute in their own process: GeopipeErrors of the run are logged as one line there."""
    from geopipe.stages.config import load_pipeline_config

    with brief_user_errors():
        return geopipe_flow(load_pipeline_config(config_path))


def deployment_name(config_path: str, name: str | None = None) -> str:
    """The deployment's name: ``name``, else ``geopipe-<config stem>``."""
    return name or f"geopipe-{os.path.splitext(os.path.basename(config_path))[0]}"


def scheduled_deployment(config_path: str, *, cron: str | None = None, interval_s: float | None = None, name: str | None = None):
    """A Prefect deployment of :func:`scheduled_flow` for ``config_path`` on a cron or interval schedule.
    Its entrypoint is the module path ``geopipe.flows.pipeline_flow.scheduled_flow`` (not a file path
    relative to the directory serve was started in), and it is unpaused when served again."""
    from prefect.deployments.runner import EntrypointType

    path = os.path.abspath(config_path)
    if not os.path.exists(path):
        raise GeopipeError(f"config not found: {config_path}")
    check_schedule(cron, interval_s)
    return scheduled_flow.to_deployment(
        name=deployment_name(config_path, name),
        parameters={"config_path": path},
        cron=cron,
        interval=interval_s,
        paused=False,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )

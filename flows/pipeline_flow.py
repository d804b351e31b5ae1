"""Prefect flow chaining the stages: (demo data) → extract → train → predict → evaluate, and
the uncertainty branch (retrieve → BayesCap → score → evaluate, :mod:`geopipe.flows.uncertainty_flow`).

Tasks are thin wrappers around the stage functions. Extraction is resumable at shard level
by the stage itself (completion records in the store), so a retried or re-run flow only
embeds new shards; caching by inputs is therefore left to the stages (NO_CACHE here), which
also sees through deleted or changed outputs. Runs on Prefect's ephemeral local server
(SQLite) with no setup.
"""

from __future__ import annotations

import logging
import os

# geopipe runs offline: Prefect's local server must not try to phone home.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the ephemeral SQLite server can take longer than Prefect's 20 s default on a busy 2-core box
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.stages.config import PipelineConfig
from geopipe.stages.demo import run_demo_data
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate, store_mean_direction
from geopipe.stages.extract import run_extract
from geopipe.stages.predict import run_predict
from geopipe.stages.train import run_train

__all__ = ["geopipe_flow", "run_pipeline", "scheduled_flow", "scheduled_deployment", "demo_data_task", "extract_task", "train_task",
           "predict_task", "evaluate_task"]


class _UserErrorsWithoutTraceback(logging.Filter):
    """A GeopipeError (a missing shard, a bad option) is logged by Prefect as one line: the CLI
    prints it once more as ``geopipe: error: ...``; tracebacks stay for everything else (bugs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], GeopipeError) and not _DEBUG["on"]:
            record.exc_info, record.exc_text = None, None
        return True


_DEBUG = {"on": False}  # run_pipeline(debug=True): keep every traceback
_FLOW_RUN: dict = {}  # the name of the flow run in progress (for one-line errors)

for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_UserErrorsWithoutTraceback())


def run_pipeline(cfg: PipelineConfig, *, debug: bool = False) -> dict:
    """:func:`geopipe_flow`; a stage's GeopipeError comes back as one line naming the flow run
    (its full trace is in the Prefect UI, or printed here with ``debug``)."""
    import traceback

    _FLOW_RUN.clear()
    _DEBUG["on"] = debug
    try:
        return geopipe_flow(cfg)
    except GeopipeError as exc:
        if debug:
            traceback.print_exception(exc)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        name = _FLOW_RUN.get("name")
        where = f" (flow run {name!r}; full trace with `geopipe run --debug` or in the Prefect UI)" if name else ""
        raise GeopipeError(text + where) from None
    finally:
        _DEBUG["on"] = False


def _run_name(verb: str, field: str):
    """A task-run name after the task's input: ``extract train.zarr``, ``train model``."""

    def name() -> str:
        from prefect.runtime import task_run

        value = getattr(task_run.parameters["cfg"], field)
        first = value[0] if isinstance(value, (list, tuple)) and value else value
        more = f" +{len(value) - 1}" if isinstance(value, (list, tuple)) and len(value) > 1 else ""
        return f"{verb} {os.path.basename(str(first).rstrip('/')) or first}{more}"

    return name


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: a GeopipeError (a missing shard, a bad option) fails at once;
    anything else (an I/O hiccup, a killed worker) goes to the task's retries."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, GeopipeError)


def _store_summary_artifact(res) -> None:
    """The extracted store as a Prefect table artifact (one row), keyed ``store-<name>``
    (``store-train-zarr``): Prefect keeps each key's history across runs."""
    import re

    from prefect.artifacts import create_table_artifact

    from geopipe.pipeline.store.reader import open_store

    attrs = open_store(res.store).attrs
    key = "store-" + re.sub(r"[^a-z0-9]+", "-", os.path.basename(res.store.rstrip("/")).lower()).strip("-")
    create_table_artifact(key=key, description=f"embedding store {res.store}", table=[{
        "store": res.store, "records": attrs["rows"], "rejected (all runs)": sum(attrs["rejects"].values()),
        "shards": len(attrs["shards"]), "shards added": res.shards_done, "shards skipped": res.shards_skipped,
        "added": res.n_ok, "rejected": res.n_rejected, "seconds": round(res.seconds, 1),
        "backbone": attrs["backbone"].get("name"), "dtype": attrs["dtype"],
    }])


@task(name="demo-data", task_run_name=_run_name("demo-data", "out"), cache_policy=NO_CACHE)
def demo_data_task(cfg):
    return run_demo_data(cfg)


@task(name="extract", task_run_name=_run_name("extract", "store"), retries=2, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_user_error, cache_policy=NO_CACHE)
def extract_task(cfg):
    res = run_extract(cfg)
    get_run_logger().info("extract %s: %d ok, %d rejected, %d shards done", res.store, res.n_ok, res.n_rejected, res.shards_done)
    _store_summary_artifact(res)
    return res


@task(name="train", task_run_name=_run_name("train", "out"), cache_policy=NO_CACHE)
def train_task(cfg):
    res = run_train(cfg)
    get_run_logger().info("train %s: step %d, val loss %.4f", res.method, res.step, res.val_loss)
    return res


@task(name="predict", task_run_name=_run_name("predict", "out"), cache_policy=NO_CACHE)
def predict_task(cfg):
    res = run_predict(cfg)
    get_run_logger().info("predict: %d records, %.0f records/s", res.n_records, res.records_per_s)
    return res


@task(name="evaluate", task_run_name=_run_name("evaluate", "predictions"), cache_policy=NO_CACHE)
def evaluate_task(cfg: EvaluateConfig):
    from prefect.artifacts import create_markdown_artifact

    res = run_evaluate(cfg)
    create_markdown_artifact(key="geopipe-evaluation", description="evaluation of the predictions",
                             markdown=f"# geopipe evaluation\n\n```\n{res.table}\n```\n")
    return res


@flow(name="geopipe", validate_parameters=False, log_prints=True)
def geopipe_flow(cfg: PipelineConfig) -> dict:
    """Run the whole pipeline; returns {"table": str | None, "reports": list, "results": {...},
    "skipped": [reasons], "uncertainty": dict | None}. After extraction, train/predict/evaluate
    (and the uncertainty branch's steps) run only when their inputs changed since the last
    successful run (``geopipe.stages.rerun``; ``[rerun]`` in the config)."""
    from prefect.runtime import flow_run

    _FLOW_RUN["name"] = flow_run.name
    results = {}
    if cfg.demo_data is not None:
        results["demo_data"] = demo_data_task(cfg.demo_data)
    results["extract"] = [extract_task(e) for e in cfg.extract]
    out = {"table": None, "reports": [], "results": results, "skipped": [], "uncertainty": None}
    if cfg.train is not None:
        out.update(_generative_branch(cfg, results))
    if cfg.uncertainty is not None:
        from geopipe.flows.uncertainty_flow import run_uncertainty_branch

        out["uncertainty"] = run_uncertainty_branch(cfg)
    return out


def _generative_branch(cfg: PipelineConfig, results: dict) -> dict:
    """train → predict → evaluate, each skipped when unchanged; {"table", "reports", "skipped"}."""
    from geopipe.stages.rerun import plan_rerun, save_run_state

    plan = plan_rerun(cfg, cfg.rerun, cfg.baseline_store)
    for reason in plan.reasons:
        get_run_logger().info(reason)
    if plan.train is not None:
        results["train"] = train_task(plan.train)
    if plan.predict is not None:
        results["predict"] = predict_task(plan.predict)
    if not plan.evaluate:
        return {"table": plan.previous["table"], "reports": plan.previous["reports"], "skipped": list(plan.reasons)}
    evaluate_cfg = cfg.evaluate
    if cfg.baseline_store:
        import dataclasses

        evaluate_cfg = dataclasses.replace(evaluate_cfg, baseline_latlon=store_mean_direction(cfg.baseline_store))
    ev = evaluate_task(evaluate_cfg)
    results["evaluate"] = ev
    save_run_state(cfg.workdir, plan, ev.table, ev.reports)
    return {"table": ev.table, "reports": ev.reports, "skipped": list(plan.reasons)}


@flow(name="geopipe-scheduled", validate_parameters=True, log_prints=True)
def scheduled_flow(config_path: str) -> dict:
    """Re-read the TOML config and run the pipeline: a scheduled run picks up new shards that
    the config's patterns now match (extraction appends only shards not yet in the store)."""
    from geopipe.stages.config import load_pipeline_config

    return geopipe_flow(load_pipeline_config(config_path))


def scheduled_deployment(config_path: str, *, cron: str | None = None, interval_s: float | None = None, name: str | None = None):
    """A Prefect deployment of :func:`scheduled_flow` for ``config_path`` on a cron or interval schedule."""
    path = os.path.abspath(config_path)
    if not os.path.exists(path):
        raise GeopipeError(f"config not found: {config_path}")
    if (cron is None) == (interval_s is None):
        raise ConfigError("give exactly one of --cron or --interval")
    return scheduled_flow.to_deployment(
        name=name or f"geopipe-{os.path.splitext(os.path.basename(path))[0]}",
        parameters={"config_path": path},
        cron=cron,
        interval=interval_s,
    )

"""The Prefect tasks of geopipe's flows, and what they share: task-run names, the retry
condition, Prefect's settings for an offline run and the brief logging of user errors.

Tasks are thin wrappers around the stage functions: each logs one line and, where useful,
publishes an artifact. A pipeline run replaces its own outputs (``overwrite``): which steps run
again is the rerun plan's decision (:mod:`geopipe.stages.rerun`), not an existing file's. Caching by inputs is left to the stages (NO_CACHE here), which see
through deleted or changed outputs. Nothing here runs at import: the settings and the log
filter apply inside :func:`prefect_defaults` and :func:`brief_user_errors` only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.table import as_markdown
from geopipe.stages.demo import run_demo_data
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.extract import run_extract
from geopipe.stages.predict import run_predict
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.train import run_train
from geopipe.stages.uncertainty import BayesCapStageConfig, ScoreFileConfig, run_score_file, run_train_bayescap

__all__ = ["PAIR_STATS", "run_name", "retry_unless_user_error", "prefect_defaults", "brief_user_errors", "console_on_success",
           "demo_data_task",
           "extract_task", "train_task", "predict_task", "evaluate_task", "retrieve_task", "bayescap_task", "score_task",
           "evaluate_uncertainty_task"]

#: Pair statistics a BayesCap task reports (artifact, run state).
PAIR_STATS = ("status", "kind", "n_records", "n_pairs", "n_train", "n_val", "pairable_fraction")
_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def run_name(verb: str, field: str):
    """A task-run name after the task's input: ``extract train.zarr``, ``train model``."""

    def name() -> str:
        from prefect.runtime import task_run

        value = getattr(task_run.parameters["cfg"], field)
        first = value[0] if isinstance(value, (list, tuple)) and value else value
        more = f" +{len(value) - 1}" if isinstance(value, (list, tuple)) and len(value) > 1 else ""
        return f"{verb} {os.path.basename(str(first).rstrip('/')) or first}{more}"

    return name


def retry_unless_user_error(task, task_run, state) -> bool:
    """Prefect retry condition: a GeopipeError (a missing shard, a bad option) fails at once;
    anything else (an I/O hiccup, a killed worker) goes to the task's retries."""
    exc = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return not isinstance(exc, GeopipeError)


@contextlib.contextmanager
def prefect_defaults() -> Iterator[None]:
    """Prefect settings of a geopipe run, unless the user set them: no analytics calls from the
    local server (geopipe runs offline) and 180 s for the ephemeral SQLite server to start
    (Prefect's 20 s is too short on a busy 2-core machine)."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

    with temporary_settings(set_defaults={PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                          PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield


class _UserErrorsWithoutTraceback(logging.Filter):
    """A GeopipeError (a missing shard, a bad option) is logged by Prefect as one line: the CLI
    prints it once more as ``geopipe: error: ...``; tracebacks stay for everything else (bugs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], GeopipeError):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def brief_user_errors(debug: bool = False) -> Iterator[None]:
    """While inside, Prefect's flow- and task-run logs show a GeopipeError as one line (with
    ``debug``: unchanged, every traceback)."""
    if debug:
        yield
        return
    quiet = _UserErrorsWithoutTraceback()
    loggers = [logging.getLogger(name) for name in _RUN_LOGGERS]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _Hold(logging.Filter):
    """Keeps the records a console handler would print (see :func:`console_on_success`)."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _console_handlers() -> list[logging.Handler]:
    """The handlers that print Prefect's log lines on the terminal (Prefect's logging config puts
    its console handler on the root and uvicorn loggers)."""
    found = []
    for logger in (logging.getLogger(), logging.getLogger("uvicorn")):
        found += [h for h in logger.handlers if type(h).__name__ == "PrefectConsoleHandler" and h not in found]
    return found


def _quiet_console_at_exit() -> None:
    """At interpreter exit (before Prefect stops its temporary server): no more console lines."""
    for handler in _console_handlers():
        handler.setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def console_on_success(debug: bool = False) -> Iterator[None]:
    """While inside, Prefect's console lines are held; they are printed when the block ends
    normally, and dropped when it raises a GeopipeError (its one ``geopipe: error:`` line says what
    failed; the temporary server's stop line at exit is dropped too). With ``debug``: live, as
    Prefect prints them. The API log handler (the Prefect UI) is untouched."""
    if debug:
        yield
        return
    holds = [(handler, _Hold()) for handler in _console_handlers()]
    for handler, hold in holds:
        handler.addFilter(hold)
    failed = False
    try:
        yield
    except GeopipeError:
        failed = True
        raise
    finally:
        for handler, hold in holds:
            handler.removeFilter(hold)
        if failed:
            import atexit

            atexit.register(_quiet_console_at_exit)  # runs before Prefect's own exit hooks (last in, first out)
        else:
            for handler, hold in holds:
                for record in hold.records:
                    handler.handle(record)


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


@task(name="demo-data", task_run_name=run_name("demo-data", "out"), cache_policy=NO_CACHE)
def demo_data_task(cfg):
    return run_demo_data(cfg)


@task(name="extract", task_run_name=run_name("extract", "store"), retries=2, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def extract_task(cfg):
    res = run_extract(cfg)
    get_run_logger().info("extract %s: %d ok, %d rejected, %d shards done", res.store, res.n_ok, res.n_rejected, res.shards_done)
    _store_summary_artifact(res)
    return res


@task(name="train", task_run_name=run_name("train", "out"), cache_policy=NO_CACHE)
def train_task(cfg):
    res = run_train(cfg)
    get_run_logger().info("train %s: step %d, val loss %.4f", res.method, res.step, res.val_loss)
    return res


@task(name="predict", task_run_name=run_name("predict", "out"), cache_policy=NO_CACHE)
def predict_task(cfg):
    res = run_predict(cfg)
    get_run_logger().info("predict: %d records, %.0f records/s", res.n_records, res.records_per_s)
    return res


@task(name="evaluate", task_run_name=run_name("evaluate", "predictions"), cache_policy=NO_CACHE)
def evaluate_task(cfg: EvaluateConfig):
    from prefect.artifacts import create_markdown_artifact

    res = run_evaluate(dataclasses.replace(cfg, overwrite=True))
    create_markdown_artifact(key="geopipe-evaluation", description="evaluation of the predictions",
                             markdown=f"# geopipe evaluation\n\n{as_markdown(res.table)}")
    return res


@task(name="retrieve", task_run_name=run_name("retrieve", "out"), retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)
def retrieve_task(cfg: RetrieveConfig):
    res = run_retrieve(dataclasses.replace(cfg, overwrite=True))
    cells = ", ".join(f"R@{k} {v:.3f}" for k, v in res.recall["recall"].items() if v is not None) or "no answerable query"
    get_run_logger().info("retrieve: %d queries against %d records (%s): %s", res.n_queries, res.n_database, res.backend, cells)
    return res


@task(name="bayescap", task_run_name=run_name("bayescap", "out"), cache_policy=NO_CACHE)
def bayescap_task(cfg: BayesCapStageConfig):
    from prefect.artifacts import create_table_artifact

    res = run_train_bayescap(cfg)
    get_run_logger().info("bayescap: %s", res.message)
    create_table_artifact(key="bayescap-pairs", description=f"viewpoint pairs mined on {cfg.store}: {res.message}",
                          table=[{k: res.pairs.get(k) for k in PAIR_STATS} | {"best step": res.best_step,
                                                                                "seconds": round(res.seconds, 1)}])
    return res


@task(name="score", task_run_name=run_name("score", "predictions"), cache_policy=NO_CACHE)
def score_task(cfg: ScoreFileConfig):
    res = run_score_file(cfg)
    what = f"log_u of {res.n_records} records with {res.checkpoint}" if res.checkpoint else "no BayesCap checkpoint: log_u cleared"
    get_run_logger().info("score %s: %s (%.1f s)", res.out, what, res.seconds)
    return res


@task(name="evaluate-uncertainty", task_run_name=run_name("evaluate-uncertainty", "predictions"), cache_policy=NO_CACHE)
def evaluate_uncertainty_task(cfg: EvaluateConfig):
    from prefect.artifacts import create_markdown_artifact

    res = run_evaluate(dataclasses.replace(cfg, overwrite=True))
    plots = "".join(f"- {p}\n" for p in res.plots)
    create_markdown_artifact(key="geopipe-uncertainty", description="retrieval and failure prediction",
                             markdown=f"# geopipe retrieval evaluation\n\n{as_markdown(res.table)}\n"
                                      f"## Failure prediction\n\n{as_markdown(res.uncertainty_table)}"
                                      + (f"\n## Plots\n\n{plots}" if plots else ""))
    return res

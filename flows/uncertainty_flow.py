"""The uncertainty branch of the pipeline flow: retrieve → pairs + BayesCap → score → evaluate.

Runs inside :func:`geopipe.flows.pipeline_flow.geopipe_flow` after extraction (and the
generative branch, when configured). Each step is a Prefect task named after its input, skipped
when its inputs are unchanged since the last successful run (``geopipe.stages.rerun``, the same
state file). Too few viewpoint pairs with the ``skip`` policy is not a failure: the task says
why and the branch goes on with the training-free scores.
"""

from __future__ import annotations

import dataclasses

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from geopipe.flows.pipeline_flow import _retry_unless_user_error, _run_name
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.uncertainty import BayesCapStageConfig, ScoreFileConfig, run_score_file, run_train_bayescap

__all__ = ["retrieve_task", "bayescap_task", "score_task", "evaluate_uncertainty_task", "run_uncertainty_branch"]

_PAIR_STATS = ("status", "kind", "n_records", "n_pairs", "n_train", "n_val", "pairable_fraction")


@task(name="retrieve", task_run_name=_run_name("retrieve", "out"), retries=1, retry_delay_seconds=5,
      retry_condition_fn=_retry_unless_user_error, cache_policy=NO_CACHE)
def retrieve_task(cfg: RetrieveConfig):
    res = run_retrieve(cfg)
    cells = ", ".join(f"R@{k} {v:.3f}" for k, v in res.recall["recall"].items() if v is not None) or "no answerable query"
    get_run_logger().info("retrieve: %d queries against %d records (%s): %s", res.n_queries, res.n_database, res.backend, cells)
    return res


@task(name="bayescap", task_run_name=_run_name("bayescap", "out"), cache_policy=NO_CACHE)
def bayescap_task(cfg: BayesCapStageConfig):
    from prefect.artifacts import create_table_artifact

    res = run_train_bayescap(cfg)
    get_run_logger().info("bayescap: %s", res.message)
    create_table_artifact(key="bayescap-pairs", description=f"viewpoint pairs mined on {cfg.store}: {res.message}",
                          table=[{k: res.pairs.get(k) for k in _PAIR_STATS} | {"best step": res.best_step,
                                                                                 "seconds": round(res.seconds, 1)}])
    return res


@task(name="score", task_run_name=_run_name("score", "predictions"), cache_policy=NO_CACHE)
def score_task(cfg: ScoreFileConfig):
    res = run_score_file(cfg)
    what = f"log_u of {res.n_records} records with {res.checkpoint}" if res.checkpoint else "no BayesCap checkpoint: log_u cleared"
    get_run_logger().info("score %s: %s (%.1f s)", res.out, what, res.seconds)
    return res


@task(name="evaluate-uncertainty", task_run_name=_run_name("evaluate-uncertainty", "predictions"), cache_policy=NO_CACHE)
def evaluate_uncertainty_task(cfg: EvaluateConfig):
    from prefect.artifacts import create_markdown_artifact

    res = run_evaluate(cfg)
    plots = "".join(f"- {p}\n" for p in res.plots)
    create_markdown_artifact(key="geopipe-uncertainty", description="retrieval and failure prediction",
                             markdown=f"# geopipe retrieval evaluation\n\n```\n{res.table}\n```\n\n"
                                      f"## Failure prediction\n\n```\n{res.uncertainty_table}\n```\n"
                                      + (f"\n## Plots\n\n{plots}" if plots else ""))
    return res


def _checkpoint(branch, plan) -> tuple[str | None, dict | None]:
    """The BayesCap checkpoint that scores (None: training-free scores only) and the BayesCap
    state to record, after the bayescap task ran or was skipped."""
    if branch.bayescap is None:
        return branch.retrieve.uncertainty_checkpoint, None
    if plan.bayescap is None:  # skipped: its last outcome stands
        state = plan.previous["bayescap"]
        return (branch.bayescap.out if state["status"] == "trained" else None), state
    res = bayescap_task(plan.bayescap)
    state = {"status": res.status, "message": res.message, "pairs": {k: res.pairs.get(k) for k in _PAIR_STATS}}
    if res.status != "trained":
        get_run_logger().info("uncertainty: going on with the training-free scores (%s)", res.message)
    return res.out, state


def run_uncertainty_branch(cfg) -> dict:
    """Run the uncertainty branch of ``cfg`` (a PipelineConfig with ``uncertainty``) inside the
    flow; returns {"table", "uncertainty_table", "reports", "bayescap", "results", "skipped"}."""
    from geopipe.stages.rerun import plan_uncertainty, save_uncertainty_state

    branch = cfg.uncertainty
    plan = plan_uncertainty(branch, cfg.rerun, cfg.workdir)
    for reason in plan.reasons:
        get_run_logger().info(reason)
    results = {}
    if plan.retrieve is not None:  # the search only: the score task writes the BayesCap columns
        results["retrieve"] = retrieve_task(dataclasses.replace(plan.retrieve, uncertainty_checkpoint=None))
    checkpoint, bayescap = _checkpoint(branch, plan)
    if plan.score:
        r = branch.retrieve
        results["score"] = score_task(ScoreFileConfig(predictions=r.out, store=r.query, checkpoint=checkpoint,
                                                      mc_passes=r.mc_passes, seed=r.seed))
    if not plan.evaluate:
        prev = plan.previous
        return {"table": prev["table"], "uncertainty_table": prev["uncertainty_table"], "reports": prev["reports"],
                "bayescap": bayescap, "results": results, "skipped": list(plan.reasons)}
    ev = evaluate_uncertainty_task(branch.evaluate)
    results["evaluate"] = ev
    entry = {"table": ev.table, "uncertainty_table": ev.uncertainty_table, "reports": ev.reports, "bayescap": bayescap}
    save_uncertainty_state(cfg.workdir, plan, entry)
    return {**entry, "results": results, "skipped": list(plan.reasons)}

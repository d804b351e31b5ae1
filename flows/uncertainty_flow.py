"""The uncertainty branch of the pipeline flow: retrieve → pairs + BayesCap → score → evaluate.

Runs inside :func:`geopipe.flows.pipeline_flow.geopipe_flow` after extraction (and the
generative branch, when configured); its tasks are in :mod:`geopipe.flows.tasks`, and it
imports nothing from the pipeline flow. Each step is a Prefect task named after its input, skipped
when its inputs are unchanged since the last successful run (``geopipe.stages.rerun``, the same
state file). Too few viewpoint pairs with the ``skip`` policy is not a failure: the task says
why and the branch goes on with the training-free scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from prefect import get_run_logger

from geopipe.flows.tasks import PAIR_STATS, bayescap_task, evaluate_uncertainty_task, retrieve_task, score_task
from geopipe.stages.uncertainty import ScoreFileConfig

__all__ = ["UncertaintyResult", "run_uncertainty_branch"]


@dataclass(frozen=True)
class UncertaintyResult:
    """What the uncertainty branch gives back: the evaluation and failure-prediction tables and
    reports (the last successful run's when nothing changed), the BayesCap outcome ({"status",
    "message", "pairs"}, None without ``[uncertainty.bayescap]``), the stage results of the
    steps that ran (by step name) and why steps were skipped."""

    table: str
    uncertainty_table: str
    reports: list
    bayescap: dict | None = None
    results: dict = field(default_factory=dict)
    skipped: tuple[str, ...] = ()


def _checkpoint(branch, plan) -> tuple[str | None, dict | None]:
    """The BayesCap checkpoint that scores (None: training-free scores only) and the BayesCap
    state to record, after the bayescap task ran or was skipped."""
    if branch.bayescap is None:
        return branch.retrieve.uncertainty_checkpoint, None
    if plan.bayescap is None:  # skipped: its last outcome stands
        state = plan.previous["bayescap"]
        return (branch.bayescap.out if state["status"] == "trained" else None), state
    res = bayescap_task(plan.bayescap)
    state = {"status": res.status, "message": res.message, "pairs": {k: res.pairs.get(k) for k in PAIR_STATS}}
    if res.status != "trained":
        get_run_logger().info("uncertainty: going on with the training-free scores (%s)", res.message)
    return res.out, state


def run_uncertainty_branch(cfg) -> UncertaintyResult:
    """Run the uncertainty branch of ``cfg`` (a PipelineConfig with ``uncertainty``) inside the flow."""
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
        return UncertaintyResult(prev["table"], prev["uncertainty_table"], prev["reports"], bayescap, results, tuple(plan.reasons))
    ev = evaluate_uncertainty_task(branch.evaluate)
    results["evaluate"] = ev
    entry = {"table": ev.table, "uncertainty_table": ev.uncertainty_table, "reports": ev.reports, "bayescap": bayescap}
    save_uncertainty_state(cfg.workdir, plan, entry)
    return UncertaintyResult(ev.table, ev.uncertainty_table, ev.reports, bayescap, results, tuple(plan.reasons))

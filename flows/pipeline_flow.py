"""Prefect flow chaining the stages: (demo data) → extract → train → predict → evaluate.

Tasks are thin wrappers around the stage functions. Extraction is resumable at shard level
by the stage itself (completion records in the store), so a retried or re-run flow only
embeds new shards; caching by inputs is therefore left to the stages (NO_CACHE here), which
also sees through deleted or changed outputs. Runs on Prefect's ephemeral local server
(SQLite) with no setup.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from stages.config import PipelineConfig
from stages.demo import run_demo_data
from stages.evaluate import EvaluateConfig, run_evaluate, store_mean_direction
from stages.extract import run_extract
from stages.predict import run_predict
from stages.train import run_train

__all__ = ["geopipe_flow", "demo_data_task", "extract_task", "train_task", "predict_task", "evaluate_task"]


@task(name="demo-data", cache_policy=NO_CACHE)
def demo_data_task(cfg):
    return run_demo_data(cfg)


@task(name="extract", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def extract_task(cfg):
    res = run_extract(cfg)
    get_run_logger().info("extract %s: %d ok, %d rejected, %d shards done", res.store, res.n_ok, res.n_rejected, res.shards_done)
    return res


@task(name="train", cache_policy=NO_CACHE)
def train_task(cfg):
    res = run_train(cfg)
    get_run_logger().info("train %s: step %d, val loss %.4f", res.method, res.step, res.val_loss)
    return res


@task(name="predict", cache_policy=NO_CACHE)
def predict_task(cfg):
    res = run_predict(cfg)
    get_run_logger().info("predict: %d records, %.0f records/s", res.n_records, res.records_per_s)
    return res


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: EvaluateConfig):
    return run_evaluate(cfg)


@flow(name="geopipe", validate_parameters=False, log_prints=True)
def geopipe_flow(cfg: PipelineConfig) -> dict:
    """Run the whole pipeline; returns {"table": str, "report": dict, "results": {...}}."""
    results = {}
    if cfg.demo_data is not None:
        results["demo_data"] = demo_data_task(cfg.demo_data)
    results["extract"] = [extract_task(e) for e in cfg.extract]
    results["train"] = train_task(cfg.train)
    results["predict"] = predict_task(cfg.predict)
    evaluate_cfg = cfg.evaluate
    if cfg.baseline_store:
        import dataclasses

        evaluate_cfg = dataclasses.replace(evaluate_cfg, baseline_latlon=store_mean_direction(cfg.baseline_store))
    ev = evaluate_task(evaluate_cfg)
    results["evaluate"] = ev
    return {"table": ev.table, "reports": ev.reports, "results": results}

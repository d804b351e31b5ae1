"""Human tables of ``geopipe bench``: one row per measured figure with its same-run baseline, the
ratio, the target and a verdict (met / missed; "-" where no target is stated). The JSON of the
benchmarks stays what ``--json`` and ``-o`` write.

Targets (the README's benchmark tables): sampling and streamed training, import and extract run
at ≥ 0.9 of their bare loops; an exact-likelihood function evaluation costs ≤ 5 forwards;
streamed training stays under 2 GB peak RSS; Dask predict on a running local:2 cluster adds ≤ 15 %.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Target", "BENCH_ROWS", "bench_rows", "format_bench_table"]


@dataclass(frozen=True)
class Target:
    """``value <op> bound``: op ">=" or "<="; text as printed (``≥ 0.9``)."""

    op: str
    bound: float

    @property
    def text(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.bound:g}"

    def met(self, value: float) -> bool:
        return {">=": operator.ge, "<=": operator.le}[self.op](value, self.bound)


def _f(v, spec: str = ".3g", unit: str = "") -> str:
    return "-" if v is None else f"{format(v, spec)}{unit}"


#: benchmark → rows (label, figure(result) → str, baseline(result) → str, ratio key, target or None)
BENCH_ROWS: dict[str, list[tuple[str, Callable, Callable, str, Target | None]]] = {
    "predict": [("guided sampling, records/s", lambda r: _f(r.get("records_per_s")),
                 lambda r: f"bare forwards {_f(r.get('bare_forward_s'))} s", "ratio_bare_over_sample", Target(">=", 0.9))],
    "nll": [("exact NLL, records/s", lambda r: f"{_f(r.get('records_per_s'))} ({r.get('function_evals')} evals)",
             lambda r: f"one forward {_f(r.get('forward_s'))} s", "cost_per_eval_over_forward", Target("<=", 5.0))],
    "extract": [("extract, images/s", lambda r: _f(r.get("extract_images_per_s")),
                 lambda r: f"bare backbone loop {_f(r.get('bare_images_per_s'))} images/s", "ratio", Target(">=", 0.9))],
    "extract-dask": [("extract on local:2, wall", lambda r: _f((r.get("dask") or {}).get("wall_s"), ".3g", " s"),
                      lambda r: f"one process {_f((r.get('single_process') or {}).get('wall_s'))} s", "ratio_wall", None)],
    "stream": [("streamed training, steps/s", lambda r: _f(r.get("stream_steps_per_s")),
                lambda r: f"in memory {_f(r.get('bare_steps_per_s'))} steps/s", "ratio", Target(">=", 0.9)),
               ("streamed training, peak RSS MB", lambda r: _f(r.get("peak_rss_mb_streaming"), ".4g"),
                lambda r: f"before {_f(r.get('peak_rss_mb_before'), '.4g')} MB", "peak_rss_mb_streaming", Target("<=", 2048.0))],
    "dask": [("predict on a running local:2, records/s", lambda r: _f(r.get("dask_running_cluster_records_per_s")),
              lambda r: f"in process {_f(r.get('in_process_records_per_s'))} records/s", "overhead_running_cluster",
              Target("<=", 0.15))],
    "import": [("geopipe import, rows/s", lambda r: _f(r.get("import_rows_per_s")),
                lambda r: f"np.load + zarr write {_f(r.get('bare_s'))} s", "ratio", Target(">=", 0.9))],
    "retrieval": [("top-K search, queries/s", lambda r: _f(r.get("blocked_queries_per_s")),
                   lambda r: f"bare matmul + top-k {_f(r.get('bare_queries_per_s'))} queries/s", "blocked_over_bare", None)],
    "bayescap": [("BayesCap training, ms/step", lambda r: _f(r.get("train_ms_per_step")),
                  lambda r: f"scoring {_f(r.get('score_records_per_s'))} records/s", "", None)],
}


def bench_rows(name: str, result: dict) -> list[list[str]]:
    """Table rows [benchmark, figure, baseline, ratio, target, verdict] of one benchmark's result."""
    if name == "retrieval-queries":
        return _query_rows(result)
    rows = []
    for label, figure, baseline, key, target in BENCH_ROWS.get(name, []):
        value = result.get(key) if key else None
        verdict = "-" if target is None or value is None else ("met" if target.met(float(value)) else "MISSED")
        rows.append([label, figure(result), baseline(result), _f(value), target.text if target else "-", verdict])
    return rows


def _query_rows(result: dict) -> list[list[str]]:
    rows = []
    for point in result.get("points", []):
        for mode in ("top1", "kernel"):
            r = point.get(mode) or {}
            rows.append([f"retrieve --mode {mode}, {point.get('queries')} queries",
                         f"{_f(r.get('queries_per_s'))} queries/s, {_f(r.get('peak_rss_mb'), '.4g')} MB",
                         f"bare loop {_f((point.get('bare') or {}).get('queries_per_s'))} queries/s", _f(r.get("over_bare")), "-", "-"])
    return rows


def format_bench_table(results: dict) -> str:
    """Plain-text table of every benchmark in ``results`` (name → result dict) with a verdict line."""
    header = ["benchmark", "figure", "baseline in the same run", "ratio", "target", "verdict"]
    body = [row for name, res in results.items() for row in bench_rows(name, res)]
    if not body:
        return "(no figures)"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    missed = [r[0] for r in body if r[5] == "MISSED"]
    judged = sum(r[5] in ("met", "MISSED") for r in body)
    verdict = (f"verdict: {judged - len(missed)} of {judged} targets met" + (f"; missed: {', '.join(missed)}" if missed else "")
               if judged else "verdict: no target applies to these figures")
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body), verdict])

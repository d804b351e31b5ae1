"""Failure prediction: how well each uncertainty score of a predictions file ranks its
failures, one row per (score column, failure definition), and Recall@K of retrieval files.

Scores (higher = more uncertain): the score columns of the predictions schema
(:data:`geopipe.schemas.predictions.UNCERTAINTY_SCORES`) present in the file,
and the entropy H = −(−H) of generative models (their ``neg_entropy_nats``; the effective
area ranks identically). Failure definitions: ``correct@1`` (top-1 within ``radius_m``, for
retrieval files; queries without a positive in the database are dropped) and
``error <= failure_km`` (any file with truths). Per row: sparsification (AUSC, oracle, random,
AUSE, AURG, AUSC_norm), adaptive bins with Spearman S and R², AUROC/AUPRC of failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from geopipe.pipeline.artifacts.predictions import read_columns
from geopipe.pipeline.eval.binning import BinningConfig, binned_rank_stats
from geopipe.pipeline.eval.recall import POSITIVE_RADIUS_M, haversine_m, recall_at_k, recall_summary
from geopipe.pipeline.eval.sparsification import SPARSIFICATION_STEPS, failure_detection, sparsification
from geopipe.pipeline.sphere.geometry import haversine_km
from geopipe.schemas.predictions import score_columns

__all__ = ["RECALL_RADII_KM", "FailureOptions", "read_optional_columns", "retrieval_section",
           "score_failure_rows", "failure_rows", "rank_failure_scores", "format_failure_table"]

#: Distance thresholds (km) of the coarse Recall@K, as for the geolocation accuracies.
RECALL_RADII_KM = (1, 25, 200, 750, 2500)
_LIST_COLUMNS = ("topk_lat", "topk_lon")


@dataclass(frozen=True)
class FailureOptions:
    """failure_km: a record fails when its error exceeds this (km; 750 = the country scale of the
    accuracy radii: at 25 km a coarse model fails every record and no score has anything to rank);
    radius_m: positive radius of correct@1 (metres); steps: sparsification steps; binning:
    adaptive-binning parameters."""

    failure_km: float = 750.0
    radius_m: float = POSITIVE_RADIUS_M
    steps: int = SPARSIFICATION_STEPS
    binning: BinningConfig = field(default_factory=BinningConfig)


def read_optional_columns(path: str, names) -> dict:
    """Columns of ``names`` present in a predictions file or dataset directory: floats as
    float64 arrays (NaN for null), ``answerable`` as a float array (NaN unknown), list columns
    as (N, K) float arrays padded with NaN."""
    table = read_columns(path, list(names))
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name in _LIST_COLUMNS:
            rows = col.to_pylist()
            k = max((len(r) for r in rows if r), default=0)
            arr = np.full((len(rows), k), np.nan)
            for i, r in enumerate(rows):
                if r:
                    arr[i, :len(r)] = [np.nan if v is None else v for v in r]
            out[name] = arr
        else:
            out[name] = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
    return out


def _topk_metres(cols: dict, extra: dict) -> np.ndarray | None:
    if "topk_lat" not in extra or extra["topk_lat"].shape[1] == 0 or "true_lat" not in cols:
        return None
    return haversine_m(cols["true_lat"][:, None], cols["true_lon"][:, None], extra["topk_lat"], extra["topk_lon"])


def retrieval_section(path: str, cols: dict, radius_m: float = POSITIVE_RADIUS_M) -> dict | None:
    """Recall@K of a retrieval predictions file (None for other files): at ``radius_m`` with
    both conventions (answerable queries / all queries) and, all queries, at the km radii; queries
    without a truth (unlabelled) are left out and counted (``n_unlabelled``)."""
    extra = read_optional_columns(path, ("topk_lat", "topk_lon", "answerable"))
    dist = _topk_metres(cols, extra)
    if dist is None:
        return None
    known = np.isfinite(cols["true_lat"]) & np.isfinite(cols["true_lon"])
    dist = dist[known]
    ans = extra.get("answerable")
    ans = None if ans is None or np.isnan(ans).all() else (ans[known] > 0.5)
    k = dist.shape[1]
    ks = tuple(sorted({kk for kk in (1, 5, 10, 20) if kk <= k} | {k}))
    sec = recall_summary(dist, ans, ks, radius_m)
    keyed = lambda d: {str(kk): v for kk, v in d.items()}  # noqa: E731 — JSON object keys are strings
    return {"radius_m": sec["radius_m"], "n": sec["n"], "n_unanswerable": sec["n_unanswerable"], "ks": list(ks),
            "n_unlabelled": int((~known).sum()),  # queries without a truth: no positive to find, left out
            "recall": keyed(sec["recall"]), "recall_all": keyed(sec["recall_all"]),
            "recall_km": {str(r): keyed(recall_at_k(dist, None, ks, r * 1000.0)) for r in RECALL_RADII_KM}}


def _definitions(path: str, cols: dict, opts: FailureOptions) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, correct (N,) float with NaN = excluded, row mask) of each failure definition."""
    out = []
    if "true_lat" not in cols:
        return out
    known = np.isfinite(cols["true_lat"]) & np.isfinite(cols["true_lon"])
    extra = read_optional_columns(path, ("topk_lat", "topk_lon", "answerable"))
    dist = _topk_metres(cols, extra)
    if dist is not None:
        ok = known & np.isfinite(dist[:, 0])
        if "answerable" in extra:
            ok &= ~(extra["answerable"] < 0.5)
        out.append((f"correct@1 {opts.radius_m:g} m", (np.nan_to_num(dist[:, 0], nan=np.inf) <= opts.radius_m).astype(float), ok))
    err = haversine_km(cols["lat"], cols["lon"], cols["true_lat"], cols["true_lon"])
    out.append((f"error <= {opts.failure_km:g} km", (err <= opts.failure_km).astype(float), known))
    return out


def score_failure_rows(name: str, label: str, correct: np.ndarray, mask: np.ndarray, scores: dict,
                       opts: FailureOptions = FailureOptions()) -> list[dict]:
    """One row per score of ``scores`` (name → (N,) float, higher = more uncertain) ranking the
    (N,) ``correct`` {0, 1} of failure definition ``label`` over the ``mask`` (N,) bool records
    with a finite score (fewer than 2: no row)."""
    rows = []
    for score, values in scores.items():
        keep = mask & np.isfinite(values)
        n = int(keep.sum())
        if n < 2:
            continue
        c, u = correct[keep], values[keep]
        sp = sparsification(c, u, steps=opts.steps)
        bins = binned_rank_stats(u, c, opts.binning)
        fd = failure_detection(c, u)
        rows.append({"model": name, "score": score, "failure": label, "n": n, "accuracy": float(c.mean()),
                     **{k: sp[k] for k in ("ausc", "ausc_oracle", "ausc_random", "ause", "aurg", "ausc_norm")},
                     "spearman": bins["spearman"], "r2_ols": bins["r2_ols"], "r2_direct": bins["r2_direct"],
                     "bins": bins["bins"], "auroc": fd["auroc"], "auprc": fd["auprc"],
                     "curve": sp["curve"].tolist(), "oracle": sp["oracle"].tolist(),
                     "bin_mean_u": bins["mean_u"].tolist(), "bin_accuracy": bins["mean_correct"].tolist(),
                     "bin_n": bins["n"].tolist()})
    return rows


def failure_rows(name: str, path: str, cols: dict, opts: FailureOptions = FailureOptions(),
                 skipped: list | None = None) -> list[dict]:
    """One row per (score, failure definition) of a predictions file; ``curve``/``oracle`` and
    the bins are kept for plots. Empty when the file has no truth or no score. A score column
    with fewer than 2 finite values on known truths (e.g. the empty ``log_u`` columns of a
    retrieval without BayesCap) gets no row; ``skipped`` (when given) receives its
    ``(model, score, n)`` so the table can say so."""
    scores = read_optional_columns(path, score_columns())
    if "neg_entropy_nats" in cols and np.isfinite(cols["neg_entropy_nats"]).any():
        scores["entropy_nats"] = -cols["neg_entropy_nats"]
    rows = []
    for label, correct, mask in _definitions(path, cols, opts):
        rows += score_failure_rows(name, label, correct, mask, scores, opts)
    if skipped is not None and "true_lat" in cols:
        known = np.isfinite(cols["true_lat"]) & np.isfinite(cols["true_lon"])
        scored = {r["score"] for r in rows}
        # the BayesCap columns only (filled on request): the training-free ones are empty by nature in generative files
        skipped += [(name, score, int((known & np.isfinite(v)).sum())) for score, v in scores.items()
                    if score not in scored and score in score_columns("bayescap")]
    return rows


def rank_failure_scores(rows: list[dict]) -> list[dict]:
    """Every score of each (failure definition, model) group ranked by AUROC, then AURG (both
    higher = better; rows whose AUROC is undefined, one class only, are left out). One dict per
    group with a ranked score: ``{"failure", "model", "order": [score, …], "auroc": […], "aurg":
    […], "winner", "runner_up" (None with one score), "margin_auroc", "margin_aurg"}`` (winner
    minus runner-up). Also sets ``row["rank"]`` (1 = best of its group; None when unranked)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        r["rank"] = None
        if r["auroc"] is not None:
            groups.setdefault((r["failure"], r["model"]), []).append(r)
    out = []
    for (label, model), group in groups.items():
        group = sorted(group, key=lambda r: (-r["auroc"], -r["aurg"]))  # stable: ties keep table order
        for i, r in enumerate(group, 1):
            r["rank"] = i
        win, second = group[0], group[1] if len(group) > 1 else None
        out.append({"failure": label, "model": model, "order": [r["score"] for r in group],
                    "auroc": [r["auroc"] for r in group], "aurg": [r["aurg"] for r in group],
                    "winner": win["score"], "runner_up": None if second is None else second["score"],
                    "margin_auroc": None if second is None else win["auroc"] - second["auroc"],
                    "margin_aurg": None if second is None else win["aurg"] - second["aurg"]})
    return out


def _ranking_line(g: dict) -> str:
    """One line: which score wins a group, by how much over the runner-up, the whole order, and
    the scores that rank failures inversely (AUROC < 0.45: higher where the records succeed)."""
    head = f"best failure score of {g['model']} for '{g['failure']}': {g['winner']} (AUROC {g['auroc'][0]:.3f}, AURG {g['aurg'][0]:.3f})"
    if g["auroc"][0] <= 0.55:
        head += " — no better than random"
    if g["runner_up"] is None:
        return head + ", the only score ranked"
    order = " > ".join(g["order"])
    inverted = ", ".join(f"{sc} {a:.3f}" for sc, a in zip(g["order"], g["auroc"]) if a < 0.45)
    return (f"{head}, ahead of {g['runner_up']} by {g['margin_auroc']:+.3f} AUROC / {g['margin_aurg']:+.3f} AURG; "
            f"by AUROC: {order}" + (f"; ranks failures inversely (AUROC < 0.45): {inverted}" if inverted else ""))


def _f(v, spec=".3f") -> str:
    return "-" if v is None else format(v, spec)


def _skipped_line(skipped) -> str:
    names = ", ".join(f"{m} · {s} ({n} values)" for m, s, n in dict.fromkeys(skipped))
    hint = "; log_u columns are filled by retrieve/predict --bayescap" if any(s in score_columns("bayescap") for _, s, _ in skipped) else ""
    return f"not scored (fewer than 2 finite values on records with a known truth): {names}{hint}"


def format_failure_table(rows: list[dict], skipped=()) -> str:
    """Plain-text failure-prediction table: one line per row of :func:`failure_rows`, one line
    per (failure definition, model) saying which score ranks its failures best
    (:func:`rank_failure_scores`), then a line naming the ``skipped`` (model, score, n)
    columns, if any."""
    if not rows:
        return "(no uncertainty scores with known truths)" + (f"\n{_skipped_line(skipped)}" if skipped else "")
    header = ["model", "score", "failure", "N", "acc", "AUSC", "oracle", "random", "AUSE", "AURG", "S", "R² ols",
              "bins", "AUROC", "AUPRC"]
    body = [[r["model"], r["score"], r["failure"], str(r["n"]), _f(r["accuracy"]), _f(r["ausc"]), _f(r["ausc_oracle"]),
             _f(r["ausc_random"]), _f(r["ause"]), _f(r["aurg"]), _f(r["spearman"], ".2f"), _f(r["r2_ols"], ".2f"),
             str(r["bins"]), _f(r["auroc"]), _f(r["auprc"])] for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(len(header))]
    fmt = lambda row: "  ".join(s.ljust(widths[i]) if i < 3 else s.rjust(widths[i]) for i, s in enumerate(row)).rstrip()  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths), *(fmt(b) for b in body)]
    lines.append("AUSC: area under the sparsification curve (accuracy of the kept records as the most uncertain are "
                 "removed; higher is better); AUSE = oracle − AUSC; AURG = AUSC − random; S: Spearman of binned "
                 "uncertainty vs accuracy (ideal −1); AUROC/AUPRC: the score detecting failures.")
    lines += [_ranking_line(g) for g in rank_failure_scores(rows)]
    if skipped:
        lines.append(_skipped_line(skipped))
    return "\n".join(lines)

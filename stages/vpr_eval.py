"""VPR evaluation stage: a query store against a database store → Recall@K the way place
recognition papers report it, and how well every uncertainty score predicts the top-1 failing.

Library calls only: the retrieval predictor (exact top-K, :mod:`geopipe.pipeline.retrieval.predictor`)
with positives in UTM metres (:mod:`geopipe.pipeline.vpr.positives`; ``auto``: when both stores
carry UTM of one zone, i.e. were extracted with ``--labels vpr-name``), the training-free scores
of the top-K, each BayesCap / BayesCapCycle checkpoint's log_u, log_u_alea and log_u_epi (MC
dropout, :func:`geopipe.pipeline.uncertainty.scoring.score_rows`), then per score the failure
table of :func:`geopipe.pipeline.eval.failure.score_failure_rows` on ``correct@1`` (a positive at
rank 1; queries without any positive in the database are left out of it, as in the thesis):
sparsification (AUSC, AUSE, AURG), binned Spearman S and R², AUROC/AUPRC of failure. Writes
``report.json``, ``table.txt`` and sparsification/reliability PNGs into ``out`` when given.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.eval.failure import FailureOptions, format_failure_table, score_failure_rows
from geopipe.pipeline.eval.recall import POSITIVE_RADIUS_M, format_vpr_recall
from geopipe.pipeline.retrieval.predictor import RecallTally, RetrievalOptions, load_retrieval, predict_block
from geopipe.pipeline.store.format import labelled_rows
from geopipe.pipeline.store.reader import open_store
from geopipe.pipeline.store.space import check_query_database
from geopipe.pipeline.store.stream import read_rows
from geopipe.pipeline.vpr.positives import POSITIVE_RULES, resolve_positives
from geopipe.schemas.predictions import score_columns

__all__ = ["VprEvalConfig", "VprEvalResult", "run_vpr_eval"]


@dataclass(frozen=True)
class VprEvalConfig:
    """database / queries: embedding stores (same backbone); bayescap: BayesCap checkpoints
    (``geopipe bayescap train``) whose scores join the table; out: folder for report.json,
    table.txt and plots (None: nothing written); k: neighbours (Recall@1/5/10/20 needs 20);
    positives: auto | utm | sphere; radius_m: positive radius (m); mc_passes: MC-dropout passes."""

    database: str
    queries: str
    bayescap: tuple[str, ...] = ()
    out: str | None = None
    k: int = 20
    radius_m: float = POSITIVE_RADIUS_M
    positives: str = "auto"
    mc_passes: int = 15
    backend: str = "auto"
    device: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.bayescap, (str, list)):
            object.__setattr__(self, "bayescap", (self.bayescap,) if isinstance(self.bayescap, str) else tuple(self.bayescap))
        check_int(self.k, "-k", 1, where="vpr-eval")
        check_int(self.mc_passes, "--mc-passes", 1, where="vpr-eval")
        if self.positives not in POSITIVE_RULES:
            raise ConfigError(f"vpr-eval: unknown --positives {self.positives!r}; choose one of {list(POSITIVE_RULES)}")
        r = self.radius_m
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and r > 0):
            raise ConfigError(f"vpr-eval: --radius-m must be a finite number of metres > 0, got {r!r}")
        if self.out is not None and os.path.isfile(self.out):
            raise ConfigError(f"vpr-eval: --out {self.out!r} is a file; give a folder")


@dataclass(frozen=True)
class VprEvalResult:
    """recall: RecallTally summary (+ "positives"); rows: failure-table rows (one per score);
    recall_line / table: the printed text; files: what was written into ``out``."""

    recall: dict
    rows: list
    recall_line: str
    table: str
    n_queries: int
    n_database: int
    seconds: float
    files: tuple[str, ...] = ()


def _retrieve(cfg: VprEvalConfig, qs, db):
    """(recall summary, correct@1 (Q,), answerable (Q,), training-free scores, query rows) of the labelled queries."""
    rule, db_utm, q_utm = resolve_positives(cfg.positives, qs, db)
    db_rows = np.flatnonzero(labelled_rows(db.latlon[:]))
    q_rows = np.flatnonzero(labelled_rows(qs.latlon[:]))
    if db_rows.size == 0 or q_rows.size == 0:
        raise GeopipeError(f"vpr-eval needs labelled records on both sides: {db_rows.size} in {db.path}, {q_rows.size} in {qs.path}")
    metric = "ip" if qs.attrs.get("normalized") and db.attrs.get("normalized") else "l2"
    opts = RetrievalOptions(k=min(cfg.k, int(db_rows.size)), radius_m=cfg.radius_m, backend=cfg.backend, seed=cfg.seed,
                            device=cfg.device)
    p = load_retrieval(db, opts, metric, db_rows, None, utm=db_utm)
    tally, correct, ans = RecallTally(p.ks, cfg.radius_m), [], []
    scores = {name: [] for name in score_columns("retrieval")}
    with Progress(total=q_rows.size, desc="vpr-eval", unit="query", enabled=cfg.progress) as bar:
        for a, b in p.blocks(q_rows.size):
            rows = q_rows[a:b]
            block = predict_block(p, read_rows(qs, rows), qs.keys[rows], qs.latlon[rows].astype(np.float64), first=a,
                                  query_utm=None if q_utm is None else q_utm[rows])
            tally.add(block)
            correct.append(block.hits[:, 0])
            ans.append(block.answerable)
            for name in scores:
                scores[name].append(np.asarray(block.columns[name], dtype=np.float64))
            bar.update(b - a)
    cat = {name: np.concatenate(v) for name, v in scores.items()}
    return {**tally.summary(), "positives": rule}, np.concatenate(correct), np.concatenate(ans), cat, q_rows, int(db_rows.size)


def _bayescap_scores(cfg: VprEvalConfig, qs, rows: np.ndarray) -> dict[str, np.ndarray]:
    """``<label> log_u…`` columns of every checkpoint (label: its method, or its folder when two share one)."""
    from geopipe.pipeline.uncertainty.scoring import check_bayescap, score_rows

    methods = [check_bayescap(path, qs)[1].get("method", "bayescap") for path in cfg.bayescap]  # a wrong one fails before scoring
    out = {}
    for path, method in zip(cfg.bayescap, methods):
        label = method if methods.count(method) == 1 else os.path.basename(os.path.normpath(path))
        for name, values in score_rows(path, qs, rows, passes=cfg.mc_passes, seed=cfg.seed).items():
            out[f"{label} {name}"] = np.asarray(values, dtype=np.float64)
    return out


def _write(cfg: VprEvalConfig, res: dict, rows: list, text: str) -> tuple[str, ...]:
    from geopipe.pipeline.artifacts.report import json_safe
    from geopipe.pipeline.core.provenance import provenance
    from geopipe.pipeline.viz.failure_plots import render_reliability_plot, render_sparsification_plot

    os.makedirs(cfg.out, exist_ok=True)
    files = [os.path.join(cfg.out, "report.json"), os.path.join(cfg.out, "table.txt")]
    doc = {"schema": "geopipe.vpr-eval/1", "config": {**asdict(cfg), "bayescap": list(cfg.bayescap)}, "recall": res, "uncertainty": rows,
           **{k: v for k, v in provenance().items() if k in ("version", "git_rev")}}
    with open(files[0], "w") as f:
        json.dump(json_safe(doc), f, indent=1, default=str)
    with open(files[1], "w") as f:
        f.write(text + "\n")
    if rows:
        label = "".join(ch if ch.isalnum() else "_" for ch in rows[0]["failure"].replace("@", "at")).strip("_")
        files.append(render_sparsification_plot(os.path.join(cfg.out, f"sparsification_{label}.png"), rows,
                                                title=f"Sparsification ({rows[0]['failure']})"))
        files.append(render_reliability_plot(os.path.join(cfg.out, f"reliability_{label}.png"), rows,
                                             title=f"Reliability ({rows[0]['failure']})"))
    return tuple(files)


def run_vpr_eval(cfg: VprEvalConfig) -> VprEvalResult:
    """Retrieve, score and tabulate (see the module docstring)."""
    t0 = time.perf_counter()
    qs, db = open_store(cfg.queries), open_store(cfg.database)
    check_query_database(qs, db)
    recall, correct, ans, scores, q_rows, n_db = _retrieve(cfg, qs, db)
    scores.update(_bayescap_scores(cfg, qs, q_rows))
    where = "UTM" if recall["positives"] == "utm" else "haversine"
    label = f"correct@1 {cfg.radius_m:g} m ({where})"
    rows = score_failure_rows("vpr", label, correct.astype(np.float64), ans, scores, FailureOptions(radius_m=cfg.radius_m))
    line = format_vpr_recall(recall, recall["positives"])
    table = f"{line}\n\n{format_failure_table(rows)}"
    files = _write(cfg, recall, rows, table) if cfg.out else ()
    return VprEvalResult(recall=recall, rows=rows, recall_line=line, table=table, n_queries=int(q_rows.size), n_database=n_db,
                         seconds=time.perf_counter() - t0, files=files)

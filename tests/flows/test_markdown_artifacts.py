"""Prefect markdown artifacts are Markdown tables (before: the text tables inside ``` code blocks)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import prefect.artifacts

from geopipe.flows.tasks import evaluate_task, evaluate_uncertainty_task
from geopipe.pipeline.eval.table import as_markdown
from geopipe.stages.evaluate import EvaluateConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stages"))
from test_evaluate_failure_threshold import _coarse_predictions  # noqa: E402


def _tables(markdown: str) -> list[list[list[str]]]:
    """Pipe tables of a Markdown text: rows of cells, the --- line left out."""
    tables, cur = [], None
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cur is None:
                cur = []
                tables.append(cur)
            if not all(re.fullmatch(r"-+", c) for c in cells):
                cur.append(cells)
        else:
            cur = None
    return tables


def test_text_tables_become_pipe_tables_and_notes_stay_paragraphs():
    text = "model  method   N\n-----  ------  --\nrfm    rfm     50\nvmf    vmf      5\nNLL in bits per dimension; a note."
    md = as_markdown(text)
    assert _tables(md) == [[["model", "method", "N"], ["rfm", "rfm", "50"], ["vmf", "vmf", "5"]]]
    assert md.splitlines()[1] == "|---|---|---|" and md.rstrip().endswith("\nNLL in bits per dimension; a note.")


def test_evaluation_artifacts_are_markdown_tables(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda key, markdown, **kw: seen.update({key: markdown}))
    p = _coarse_predictions(tmp_path / "p.parquet")
    q = _coarse_predictions(tmp_path / "q.parquet")
    evaluate_task.fn(EvaluateConfig(predictions=(p, q)))
    evaluate_uncertainty_task.fn(EvaluateConfig(predictions=(p,), uncertainty=True))
    assert "```" not in seen["geopipe-evaluation"] and "```" not in seen["geopipe-uncertainty"]
    (models,) = _tables(seen["geopipe-evaluation"])
    assert models[0][:3] == ["model", "method", "N"] and [r[0] for r in models[1:]] == ["p", "q"]
    assert all(len(r) == len(models[0]) for r in models)
    tables = _tables(seen["geopipe-uncertainty"])
    assert tables[-1][0][:3] == ["model", "score", "failure"] and tables[-1][1][2] == "error <= 750 km"

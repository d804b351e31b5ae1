"""evaluate --uncertainty ranks every score of a (failure definition, model) group by AUROC, then
AURG, and says in one line which wins and by how much over the runner-up."""

import numpy as np

from geopipe.pipeline.eval.failure import format_failure_table, rank_failure_scores, score_failure_rows
from geopipe.pipeline.eval.sparsification import failure_detection


def _rows(seed=0, n=600):
    rng = np.random.default_rng(seed)
    fail = rng.uniform(size=n) < 0.3
    correct = (~fail).astype(float)
    scores = {"weak": fail + rng.normal(scale=1.5, size=n),  # barely informative
              "strong": fail + rng.normal(scale=0.3, size=n),
              "inverted": -(fail + rng.normal(scale=0.5, size=n)),  # anti-correlated: below random
              "flat": np.ones(n)}  # one value for all: AUROC 0.5
    return score_failure_rows("m", "error <= 750 km", correct, np.ones(n, dtype=bool), scores), correct, scores


def test_order_margins_and_ranks_follow_auroc():
    rows, correct, scores = _rows()
    (g,) = rank_failure_scores(rows)
    auroc = {k: failure_detection(correct, v)["auroc"] for k, v in scores.items()}
    assert g["order"] == sorted(auroc, key=lambda k: -auroc[k]) == ["strong", "weak", "flat", "inverted"]
    assert g["winner"] == "strong" and g["runner_up"] == "weak"
    assert abs(g["margin_auroc"] - (auroc["strong"] - auroc["weak"])) < 1e-12 and g["margin_auroc"] > 0.2
    by = {r["score"]: r for r in rows}
    assert g["margin_aurg"] == by["strong"]["aurg"] - by["weak"]["aurg"]
    assert [by[k]["rank"] for k in g["order"]] == [1, 2, 3, 4]


def test_one_line_per_group_names_the_winner():
    rows, _, _ = _rows()
    other, _, _ = _rows(seed=1)
    for r in other:
        r["model"] = "n"
    text = format_failure_table(rows + other)
    lines = [line for line in text.splitlines() if line.startswith("best failure score")]
    assert len(lines) == 2 and lines[0].startswith("best failure score of m for 'error <= 750 km': strong (AUROC ")
    assert "ahead of weak by +0." in lines[0] and "by AUROC: strong > weak > flat > inverted; " in lines[0]
    assert lines[0].split("; ")[-1].startswith("ranks failures inversely (AUROC < 0.45): inverted 0.")


def test_undefined_auroc_is_not_ranked_and_a_lone_score_says_so():
    n = 50
    one_class = score_failure_rows("m", "error <= 25 km", np.zeros(n), np.ones(n, dtype=bool), {"a": np.arange(n, dtype=float)})
    assert rank_failure_scores(one_class) == [] and one_class[0]["rank"] is None
    rng = np.random.default_rng(2)
    c = (rng.uniform(size=n) < 0.5).astype(float)
    lone = score_failure_rows("m", "error <= 750 km", c, np.ones(n, dtype=bool), {"noise": rng.normal(size=n)})
    (line,) = [x for x in format_failure_table(lone).splitlines() if x.startswith("best")]
    assert line.endswith("the only score ranked") and ("no better than random" in line) == (lone[0]["auroc"] <= 0.55)

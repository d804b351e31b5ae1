"""How well an uncertainty score ranks failures: sparsification curves, AUSC / AUSE / AURG
(numpy, float64), AUROC / AUPRC of failure detection (scikit-learn's ``roc_auc_score`` and
``average_precision_score``, the definitions users know).

Inputs are per-query ``correct`` (1 = the answer is right, e.g. top-1 within 25 m) and a score
``u`` where **higher means more uncertain** (``log_u`` works as well as ``u``: only the order
matters). Conventions are documented in docs/retrieval_uncertainty.md (failure prediction):

* queries are removed in descending ``u`` with a stable sort, so tied scores keep ascending
  query index; step i of F removes ``(N·i)//F`` queries and the curve is the accuracy of the
  survivors at x = i/F (x = 1 is never evaluated);
* AUSC is the trapezoid over the F points with spacing 1/F (maximum (F−1)/F), AUSC_norm
  rescales it to [0, 1]; the oracle removes wrong queries first; the random curve is the
  constant overall accuracy; AUSE = AUSC_oracle − AUSC, AURG = AUSC − AUSC_random.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPARSIFICATION_STEPS", "sparsification", "ausc_warburg", "auroc", "auprc", "failure_detection"]

#: Default number of removal steps F.
SPARSIFICATION_STEPS = 100


def _inputs(correct, u) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    s = np.asarray(u, dtype=np.float64).reshape(-1)
    if c.shape != s.shape:
        raise ValueError(f"sparsification: correct has {c.size} values, score has {s.size}")
    if c.size == 0:
        raise ValueError("sparsification: no queries")
    if np.isnan(s).any():
        raise ValueError("sparsification: score contains NaN; drop or fill those queries first")
    return c, s


def _trapezoid(curve: np.ndarray, steps: int) -> float:
    return float((curve.sum() - (curve[0] + curve[-1]) / 2.0) / steps)


def sparsification(correct, u, steps: int = SPARSIFICATION_STEPS) -> dict:
    """Sparsification of ``correct`` (N,) {0,1} by score ``u`` (N,), higher = more uncertain.

    Returns ``{"x", "removed", "curve", "oracle", "random" (arrays of F), "ausc", "ausc_oracle",
    "ausc_random", "ausc_norm", "ause", "aurg", "n", "steps"}``. Requires N ≥ 1 and F ≥ 2.
    """
    c, s = _inputs(correct, u)
    if steps < 2:
        raise ValueError(f"sparsification: steps must be >= 2, got {steps}")
    n = c.size
    order = np.argsort(-s, kind="stable")
    kept = c[order]
    # suffix sums: tail[k] = Σ kept[k:], the correct survivors after removing k queries
    tail = np.concatenate([np.cumsum(kept[::-1])[::-1], [0.0]])
    removed = (n * np.arange(steps, dtype=np.int64)) // steps
    remaining = n - removed
    curve = tail[removed] / remaining
    n_correct = float(c.sum())
    oracle = (n_correct - np.maximum(0, removed - (n - n_correct))) / remaining
    rand = np.full(steps, n_correct / n)
    ausc, ausc_o, ausc_r = _trapezoid(curve, steps), _trapezoid(oracle, steps), _trapezoid(rand, steps)
    return {
        "x": np.arange(steps) / steps, "removed": removed, "curve": curve, "oracle": oracle, "random": rand,
        "ausc": ausc, "ausc_oracle": ausc_o, "ausc_random": ausc_r, "ausc_norm": ausc * steps / (steps - 1),
        "ause": ausc_o - ausc, "aurg": ausc - ausc_r, "n": n, "steps": steps,
    }


def ausc_warburg(correct, u) -> float:
    """AUSC in the Warburg et al. repository convention, for cross-checks only: 100 removal
    steps ``int(N·i/100)``, the last point dropped (99 points) and trapezoid spacing 1/99."""
    c, s = _inputs(correct, u)
    res = sparsification(c, s, steps=100)
    curve = res["curve"][:99]
    return float(np.trapezoid(curve, dx=1.0 / 99))


def _failure(correct) -> np.ndarray:
    return 1.0 - np.asarray(correct, dtype=np.float64).reshape(-1)


def _one_class(correct) -> bool:
    f = _failure(correct) > 0.5
    return bool(f.all() or not f.any())


def auroc(correct, u) -> float | None:
    """Area under the ROC curve of ``u`` as a detector of failures (correct == 0):
    :func:`sklearn.metrics.roc_auc_score` (ties count one half, as Mann–Whitney U / (n₊·n₋)).
    None when every query is right or every query is wrong."""
    from sklearn.metrics import roc_auc_score

    c, s = _inputs(correct, u)
    return None if _one_class(c) else float(roc_auc_score(_failure(c) > 0.5, s))


def auprc(correct, u) -> float | None:
    """Average precision of ``u`` as a detector of failures: :func:`sklearn.metrics.average_precision_score`
    (step-wise Σ (Rₙ − Rₙ₋₁) Pₙ over thresholds, tied scores enter together). None when every query
    is right or every query is wrong (with no right query the precision is 1 at every threshold
    whatever ``u`` says: nothing is ranked)."""
    from sklearn.metrics import average_precision_score

    c, s = _inputs(correct, u)
    return None if _one_class(c) else float(average_precision_score(_failure(c) > 0.5, s))


def failure_detection(correct, u) -> dict:
    """``{"auroc", "auprc", "failure_rate"}`` of ``u`` detecting failures (correct == 0)."""
    c, s = _inputs(correct, u)
    return {"auroc": auroc(c, s), "auprc": auprc(c, s), "failure_rate": float(_failure(c).mean())}

"""Adaptive binning of an uncertainty score and the rank statistics of the binned curve
(Spearman S and ranks from scipy.stats, R² on ranks), numpy float64. Procedure and its documented deviations:
docs/retrieval_uncertainty.md (failure prediction).

Bins follow numpy-histogram semantics: half-open ``[e_k, e_{k+1})`` with the last bin closed.
The merge loop joins an under-filled bin with its right neighbour (the last bin with its left
neighbour) until every bin holds ``min_num_samples`` or a stop rule fires. By default the stop
rule compares the number of **edges** with ``min_num_bins`` as in the thesis listing
(``faithful_min_bins_check=True``), which can end with fewer than ``min_num_bins`` bins; the
corrected rule compares the number of bins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["BinningConfig", "adaptive_bin_edges", "bin_counts", "binned_curve", "rankdata", "spearman",
           "r2_on_ranks", "binned_rank_stats"]


@dataclass(frozen=True)
class BinningConfig:
    """Adaptive-binning parameters (defaults are ours, not the thesis's: it gives none)."""

    min_num_samples: int = 50
    max_num_bins: int = 20
    min_num_bins: int = 5
    min_width_factor: float = 0.05
    max_merge_attempts: int = 100
    faithful_min_bins_check: bool = True


def bin_counts(u: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``u`` in the bins of ``edges`` (numpy-histogram semantics)."""
    return np.histogram(u, bins=edges)[0]


def _merge_pass(edges: np.ndarray, counts: np.ndarray, min_n: int) -> np.ndarray:
    kept: list[float] = []
    i, m = 0, counts.size
    while i < m:
        kept.append(float(edges[i]))
        i += 2 if (counts[i] < min_n and i < m - 1) else 1
    if counts[-1] < min_n:
        kept[-1] = float(edges[-1])  # the tail joins its left neighbour
    else:
        kept.append(float(edges[-1]))
    return np.unique(np.asarray(kept))


def adaptive_bin_edges(u, cfg: BinningConfig = BinningConfig()) -> np.ndarray:
    """Bin edges (M+1,) of the values ``u`` (N,) by the adaptive rule; ``[lo, hi]`` when all
    values are equal or merging leaves fewer than two edges."""
    x = np.asarray(u, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("adaptive_bin_edges: no values")
    if not np.isfinite(x).all():
        raise ValueError("adaptive_bin_edges: values must be finite (bin log_u, not an overflowing u)")
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    if span == 0.0:
        return np.array([lo, hi])
    q75, q25 = np.percentile(x, [75, 25])
    width = max(cfg.min_width_factor * float(q75 - q25), span / cfg.max_num_bins)
    n_bins = min(max(math.ceil(span / width), cfg.min_num_bins), cfg.max_num_bins)
    edges = np.linspace(lo, hi, n_bins + 1)
    counts = bin_counts(x, edges)
    attempts = 0
    while (counts < cfg.min_num_samples).any() and attempts < cfg.max_merge_attempts:
        edges = _merge_pass(edges, counts, cfg.min_num_samples)
        if edges.size < 2:
            return np.array([lo, hi])
        counts = bin_counts(x, edges)
        attempts += 1
        limit = edges.size if cfg.faithful_min_bins_check else edges.size - 1
        if limit <= cfg.min_num_bins:
            break
    return edges


def binned_curve(u, correct, edges) -> dict:
    """Per non-empty bin of ``edges``: ``{"n", "mean_u", "mean_correct"}`` arrays in bin order."""
    x = np.asarray(u, dtype=np.float64).reshape(-1)
    c = np.asarray(correct, dtype=np.float64).reshape(-1)
    e = np.asarray(edges, dtype=np.float64)
    idx = np.clip(np.searchsorted(e, x, side="right") - 1, 0, e.size - 2)
    n = np.bincount(idx, minlength=e.size - 1)
    su = np.bincount(idx, weights=x, minlength=e.size - 1)
    sc = np.bincount(idx, weights=c, minlength=e.size - 1)
    keep = n > 0
    return {"n": n[keep], "mean_u": su[keep] / n[keep], "mean_correct": sc[keep] / n[keep]}


def rankdata(values) -> np.ndarray:
    """1-based ranks with ties averaged: :func:`scipy.stats.rankdata` (``method="average"``), float64."""
    from scipy.stats import rankdata as _rankdata

    return _rankdata(np.asarray(values, dtype=np.float64).reshape(-1), method="average").astype(np.float64)


def spearman(x, y) -> float | None:
    """Spearman correlation (:func:`scipy.stats.spearmanr`, Pearson on average ranks); None for
    < 2 points or a constant side (where scipy warns and returns NaN)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.size < 2 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
        return None
    return float(spearmanr(x, y).statistic)


def r2_on_ranks(mean_u, mean_correct) -> dict:
    """R² of binned points: ``{"ols": …, "direct": …}`` (None where undefined).

    ``ols``: OLS line (with intercept) of rank(mean_correct) on the uncertainty level
    rank(mean_u); equals S² without ties. ``direct``: ``1 − Σ(level − ŷ)² / Σ(level − mean)²``
    with ŷ = M + 1 − rank(mean_correct), i.e. the fit to the ideal reversed ranking; equals
    −1 − 2S without ties, range (−∞, 1].
    """
    level, yr = rankdata(mean_u), rankdata(mean_correct)
    m = level.size
    out: dict[str, float | None] = {"ols": None, "direct": None}
    if m < 2:
        return out
    sst_level = float(((level - level.mean()) ** 2).sum())
    sst_y = float(((yr - yr.mean()) ** 2).sum())
    if sst_level > 0 and sst_y > 0:
        slope = float(((level - level.mean()) * (yr - yr.mean())).sum()) / sst_level
        fit = yr.mean() + slope * (level - level.mean())
        out["ols"] = 1.0 - float(((yr - fit) ** 2).sum()) / sst_y
    if sst_level > 0:
        yhat = m + 1 - yr
        out["direct"] = 1.0 - float(((level - yhat) ** 2).sum()) / sst_level
    return out


def binned_rank_stats(u, correct, cfg: BinningConfig = BinningConfig()) -> dict:
    """Adaptive bins of ``u`` and their statistics: ``{"edges", "n", "mean_u", "mean_correct",
    "bins", "spearman", "r2_ols", "r2_direct"}`` (ideal S = −1, R² = 1)."""
    edges = adaptive_bin_edges(u, cfg)
    curve = binned_curve(u, correct, edges)
    r2 = r2_on_ranks(curve["mean_u"], curve["mean_correct"])
    return {"edges": edges, **curve, "bins": int(curve["n"].size),
            "spearman": spearman(curve["mean_u"], curve["mean_correct"]), "r2_ols": r2["ols"], "r2_direct": r2["direct"]}

"""Highest-density-region (HDR) calibration of predicted densities (docs/methods.md#calibration).

Per record, with ℓ* = log p(truth | image) and ℓ_1 … ℓ_N the log densities of N samples drawn
from the same predicted distribution (nats), the **HDR rank** is

    hdr_rank = #{j : ℓ_j > ℓ*} / N  ∈ {0, 1/N, …, 1}

(the fraction of samples denser than the truth; the predictions column ``hdr_rank``). The truth
lies inside the empirical p-HDR — "its log density exceeds the (1 − p) quantile of the sample log
densities" — exactly when hdr_rank ≤ p: with the inverted-CDF empirical quantile
q = ℓ_(⌈(1−p)N⌉) (ascending order statistic), ℓ* > q ⟺ at least ⌈(1−p)N⌉ samples lie below ℓ*
⟺ N·hdr_rank ≤ N − ⌈(1−p)N⌉ = ⌊pN⌋ ⟺ hdr_rank ≤ p (ties between ℓ* and a sample have
probability 0). Hence

    coverage(p)       = mean over records of 1[hdr_rank ≤ p],   p ∈ {0.1, 0.2, …, 0.9}
    calibration error = mean over the nine levels of |coverage(p) − p|

A calibrated model has hdr_rank ~ Uniform and sits on the diagonal (up to a finite-N bias
(⌊pN⌋ + 1)/(N + 1) − p ≤ 1/(N + 1), i.e. < 0.001 for N = 1024 samples). Over-confident
predictions (too concentrated) put the truth in low-density regions: large ranks, coverage below
the diagonal; under-confident ones the reverse.
"""

from __future__ import annotations

import numpy as np

from geopipe.pipeline.infer.localizability import hdr_rank  # the one definition, re-exported here

__all__ = ["CALIBRATION_LEVELS", "hdr_rank", "calibration_table"]

#: HDR probability levels p at which coverage is reported.
CALIBRATION_LEVELS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))

# hdr_rank is k/N in float64 and p is i/10; a rank equal to p in exact arithmetic may differ from
# it by one rounding, so the comparison allows a tolerance far below 1/N.
_TOL = 1e-9


def calibration_table(ranks, levels=CALIBRATION_LEVELS) -> dict:
    """HDR coverage of (N,) ``hdr_rank`` values in [0, 1] (NaN = not computed, skipped).

    Returns ``{"n", "levels": [p…], "coverage": [mean(hdr_rank ≤ p)…], "error": mean |coverage − p|}``;
    with no usable rank, ``coverage`` and ``error`` are ``None``.
    """
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    r = r[~np.isnan(r)]
    if ((r < 0) | (r > 1)).any():
        raise ValueError("calibration_table: hdr_rank values must lie in [0, 1] (fraction of samples denser than the truth)")
    p = np.asarray(levels, dtype=np.float64)
    if p.ndim != 1 or p.size == 0 or ((p <= 0) | (p >= 1)).any():
        raise ValueError(f"calibration_table: levels must be probabilities in (0, 1), got {list(levels)}")
    out: dict = {"n": int(r.size), "levels": [float(v) for v in p]}
    if r.size == 0:
        out.update({"coverage": None, "error": None})
        return out
    cov = np.mean(r[:, None] <= p[None, :] + _TOL, axis=0)
    out.update({"coverage": [float(c) for c in cov], "error": float(np.mean(np.abs(cov - p)))})
    return out

"""Precision / recall / density / coverage on the sphere (Naeem et al. 2020; docs/methods.md#prdc).

Distances are great-circle angles between unit vectors. The angle θ is a decreasing function
of the dot product ⟨x, y⟩ = cos θ (and an increasing one of the chord ‖x − y‖), so every
comparison "θ_ij < r_i" is done exactly as "⟨x_i, y_j⟩ > cos r_i", with cos r_i itself the k-th
largest dot product of x_i with the other points of its own set (exact, by ``np.partition`` of
blocks of dot products; numpy only, so ``geopipe evaluate`` loads no torch): no angles, no
approximate index. Pairwise dot
products are formed block by block (≤ ~4M entries, ~32 MB, at a time), so 100k × 100k points
run in bounded memory; the work is O(N·M).

With R the real points (true locations), F the fake points (predictions), r_R(i) the angle from
real i to its k-th nearest *other* real point, r_F(j) likewise in F, and D_ij the real–fake angle:

    precision = mean_j 1[∃i: D_ij < r_R(i)]        recall   = mean_i 1[∃j: D_ij < r_F(j)]
    density   = (1/k) mean_j Σ_i 1[D_ij < r_R(i)]   coverage = mean_i 1[min_j D_ij < r_R(i)]
"""

from __future__ import annotations

import math

import numpy as np

from geopipe.pipeline.core.errors import check_int

__all__ = ["COLLAPSED_RADIUS_M", "prdc", "prdc_collapse_note"]

#: Largest number of pairwise dot products held at once.
_BLOCK_ELEMS = 1 << 22


def _unit(name: str, x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"prdc: {name} must be (N, 3) unit vectors, got shape {arr.shape}")
    norm = np.linalg.norm(arr, axis=1, keepdims=True)
    if not (np.isfinite(arr).all() and (norm > 0).all()):
        raise ValueError(f"prdc: {name} contains non-finite or zero vectors")
    return arr / norm


def _rows_per_block(ncols: int) -> int:
    return max(1, _BLOCK_ELEMS // max(ncols, 1))


def _kth_neighbour_cos(x: np.ndarray, k: int) -> np.ndarray:
    """(n,) cosine of the angle from each point of (n, 3) ``x`` to its k-th nearest other point
    (the point itself is excluded, its duplicates are not)."""
    n = x.shape[0]
    out = np.empty(n)
    step = _rows_per_block(n)
    for s in range(0, n, step):
        e = min(n, s + step)
        g = x[s:e] @ x.T  # (b, n) dot products
        g[np.arange(e - s), np.arange(s, e)] = -np.inf  # not the point itself
        out[s:e] = -np.partition(-g, k - 1, axis=1)[:, k - 1]
    return out


#: A real point whose k-th neighbour lies within 25 m (several photos of one place) has a
#: collapsed radius: almost no prediction can fall inside it (cosine of 25 m on the Earth).
COLLAPSED_RADIUS_M = 25.0
_COS_COLLAPSED = float(np.cos(COLLAPSED_RADIUS_M / 6_371_008.8))


def _prdc_once(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    n, m = real.shape[0], fake.shape[0]
    if n <= k or m <= k:
        raise ValueError(f"prdc: need more than k={k} points in each set (chunk), got {n} real and {m} fake")
    cos_r, cos_f = _kth_neighbour_cos(real, k), _kth_neighbour_cos(fake, k)
    precise = np.zeros(m, dtype=bool)
    recalled = np.zeros(n, dtype=bool)
    covered = np.zeros(n, dtype=bool)
    inside = 0
    step = _rows_per_block(n)
    for s in range(0, m, step):
        e = min(s + step, m)
        g = fake[s:e] @ real.T  # (b, n): cos D_ij, fakes along rows
        in_real_ball = g > cos_r[None, :]  # D_ij < r_R(i)
        precise[s:e] = in_real_ball.any(axis=1)
        covered |= in_real_ball.any(axis=0)
        inside += int(in_real_ball.sum())
        recalled |= (g > cos_f[s:e, None]).any(axis=0)  # D_ij < r_F(j)
    return {
        "precision": float(precise.mean()),
        "recall": float(recalled.mean()),
        "density": inside / (k * m),
        "coverage": float(covered.mean()),
        "collapsed_real": float((cos_r > _COS_COLLAPSED).mean()),
    }


def _chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    # torch.chunk semantics (the reference): pieces of ceil(n / chunks), the last one shorter
    size = math.ceil(n / chunks)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def prdc(real_xyz, fake_xyz, k: int = 3, chunks: int = 1) -> dict:
    """Precision, recall, density and coverage of (M, 3) fake vs (N, 3) real points on S².

    Inputs are unit vectors (re-normalised here); distances are great-circle angles (see the
    module docstring for the four definitions; all comparisons strict). ``k`` is the number of
    nearest neighbours defining each point's radius (3 in the paper). ``chunks`` = 1 (default)
    scores the whole set at once; ``chunks`` > 1 splits both sets into the same contiguous
    pieces (torch.chunk order; the literature's protocol uses 20) and averages the four numbers over pieces —
    then real and fake must be paired row by row (N == M).

    Returns ``{"precision", "recall", "density", "coverage", "collapsed_real", "k", "chunks",
    "n_real", "n_fake"}`` (``chunks`` = number of pieces actually used). Density is in [0, N/k];
    the others in [0, 1]. ``collapsed_real``: the fraction of real points whose k-th real
    neighbour is within 25 m — several photos of one place — whose radius is then too small for
    any prediction to fall in, so P, D and C understate the predictions.
    """
    check_int(k, "k", 1, where="prdc")
    check_int(chunks, "chunks", 1, where="prdc")
    real, fake = _unit("real_xyz", real_xyz), _unit("fake_xyz", fake_xyz)
    if chunks == 1:
        pieces = [_prdc_once(real, fake, k)]
    else:
        if real.shape[0] != fake.shape[0]:
            raise ValueError(f"prdc: chunks > 1 pairs real and fake rows, but got {real.shape[0]} real and {fake.shape[0]} fake points")
        pieces = [_prdc_once(real[s:e], fake[s:e], k) for s, e in _chunk_bounds(real.shape[0], chunks)]
    out: dict = {name: float(np.mean([p[name] for p in pieces]))
                 for name in ("precision", "recall", "density", "coverage", "collapsed_real")}
    out.update({"k": k, "chunks": len(pieces), "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])})
    return out


def prdc_collapse_note(entries) -> str | None:
    """One line warning that PRDC understates P, D and C when many true locations of a report
    entry (dicts with ``name`` and a ``prdc`` section) have collapsed radii; None otherwise."""
    collapsed = [(e["name"], (e.get("prdc") or {}).get("collapsed_real", 0.0)) for e in entries]
    name, frac = max(collapsed, key=lambda c: c[1], default=(None, 0.0))
    if frac <= 0.05:
        return None
    return (f"PRDC understates P, D and C: {frac:.0%} of the true locations of {name!r} have their k nearest other truths "
            f"within {COLLAPSED_RADIUS_M:g} m (several photos per place), so their radii are too small to hold a prediction; "
            f"score one photo per place for PRDC.")

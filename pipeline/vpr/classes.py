"""CosPlace classes: records binned by UTM cell and heading, the same place seen the same way.

CosPlace (Berton et al., CVPR 2022) splits its training set into classes: UTM east and north
rounded down to a multiple of M = 10 m and the heading rounded down to a multiple of α = 30°
(:func:`cosplace_classes`). Two images of one class stand within a 10 m cell looking within
30° of each other, which is what BayesCap's viewpoint pairs need ("two views of one scene"):
:func:`class_pairs` pairs the records of each class that come from different captures.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CELL_M", "ANGLE_DEG", "cosplace_classes", "class_pairs"]

#: CosPlace's class side M (metres) and heading bin α (degrees).
CELL_M = 10.0
ANGLE_DEG = 30.0


def cosplace_classes(east_north, heading_deg, cell_m: float = CELL_M, angle_deg: float = ANGLE_DEG) -> np.ndarray:
    """(N,) int64 class ids (0, 1, … in order of (east cell, north cell, heading bin)) of the
    (N, 2) UTM positions in metres and (N,) headings in degrees; −1 where either is unknown (NaN)."""
    en = np.asarray(east_north, dtype=np.float64).reshape(-1, 2)
    h = np.asarray(heading_deg, dtype=np.float64).reshape(-1) % 360.0
    ok = np.isfinite(en).all(axis=1) & np.isfinite(h)
    out = np.full(en.shape[0], -1, dtype=np.int64)
    if ok.any():
        key = np.stack([np.floor(en[ok, 0] / cell_m), np.floor(en[ok, 1] / cell_m), np.floor(h[ok] / angle_deg)], axis=1)
        out[ok] = np.unique(key, axis=0, return_inverse=True)[1].reshape(-1)
    return out


def class_pairs(classes: np.ndarray, capture: np.ndarray | None = None, eligible: np.ndarray | None = None,
                max_per_class: int = 30, seed: int = 0) -> np.ndarray:
    """(P, 2) int64 pairs i < j of eligible records in the same class (ids ≥ 0) and, with
    ``capture`` (N,) ids, of different captures. A class larger than ``max_per_class`` records
    contributes the pairs of a seeded sample of that many (bounds the quadratic growth)."""
    c = np.asarray(classes, dtype=np.int64).reshape(-1)
    keep = c >= 0 if eligible is None else (c >= 0) & np.asarray(eligible, dtype=bool)
    rows = np.flatnonzero(keep)
    rows = rows[np.argsort(c[rows], kind="stable")]
    starts = np.flatnonzero(np.r_[True, c[rows][1:] != c[rows][:-1]]) if rows.size else np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = []
    for a, b in zip(starts, np.r_[starts[1:], rows.size]):
        members = rows[a:b]
        if members.size < 2:
            continue
        if members.size > max_per_class:
            members = np.sort(rng.choice(members, size=max_per_class, replace=False))
        i, j = np.triu_indices(members.size, k=1)
        pairs = np.stack([members[i], members[j]], axis=1)
        if capture is not None:
            pairs = pairs[np.asarray(capture)[pairs[:, 0]] != np.asarray(capture)[pairs[:, 1]]]
        out.append(pairs)
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)

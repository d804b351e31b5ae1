"""Linear probes: what store metadata is linearly decodable from the embeddings.

Closed-form ridge regression with an intercept, ŷ = (e − ē)·W + ȳ, W = (XᵀX + λI)⁻¹ XᵀY on
centred rows: the (D, D) Gram matrix is summed in float32 blocks of centred rows into float64
(train and validation separately, so train + validation is one addition), and one
eigendecomposition serves every λ and every target on the same rows, O(N·D² + D³). Targets by
kind:

* ``numeric`` (a field whose values are numbers): R²;
* ``categorical`` (strings or booleans with 2 … ``max_classes`` classes): one-vs-rest ridge on
  one-hot targets, the arg-max class; accuracy against the majority class of the fitting rows;
* ``circular`` (``heading_deg``/``heading``, degrees): targets (sin h, cos h), the decoded angle
  atan2; R² of the two components and the median absolute angular error (degrees) against
  always predicting the circular mean;
* ``location`` (every store): targets the unit position vector (x, y, z) of (lat, lon); R² of
  the three components and the median great-circle error (km) of the normalised prediction
  against always predicting the spherical mean location.

R² = 1 − Σ(y − ŷ)² / Σ(y − ȳ)² over all target components, ȳ the mean of the rows scored (so a
probe on noise scores ≈ 0 or below). Rows are split into train / validation / test by spatial
blocks of ``block_m`` metres (hashed with the seed: a block feeds one part only, so nearby views
of one place never straddle the split) or, with ``block_m = 0``, row by row. λ is chosen on
validation from ``lambdas`` (relative to the mean eigenvalue of the Gram matrix), then the
probe is refitted on train + validation; ``*_train`` metrics are on those rows, ``*_test`` on
the held-out test part. Probe weights come back as unit directions in embedding space
(``"<field>"``, ``"<field>=<class>"``, ``"<field>.sin"``, ``"location.x"``, …) for
:func:`geopipe.pipeline.inspection.galleries.direction_probes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geopipe.pipeline.retrieval.split import spatial_blocks
from geopipe.pipeline.sphere.geometry import haversine_km

__all__ = ["PROBE_TARGET_KINDS", "ProbeConfig", "ProbeResult", "split_parts", "target_kind", "Gram", "Ridge", "run_probes"]

PROBE_TARGET_KINDS = ("numeric", "categorical", "circular", "location")


@dataclass(frozen=True)
class ProbeConfig:
    """block_m: spatial block size in metres (0: split row by row); test_fraction and
    val_fraction: shares of blocks held out; lambdas: ridge strengths relative to the mean
    eigenvalue of the centred Gram matrix; max_classes: largest number of classes of a
    categorical field; circular_fields: fields read as headings in degrees; seed."""

    block_m: float = 500.0
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    lambdas: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    max_classes: int = 64
    circular_fields: tuple[str, ...] = ("heading_deg", "heading")
    seed: int = 0


@dataclass(frozen=True)
class ProbeResult:
    """One probe: name (field, or "location"), kind (:data:`PROBE_TARGET_KINDS`), rows fitted
    (train + validation) and tested, the chosen relative λ, metrics (r2_train, r2_test;
    acc_train, acc_test, majority_test, n_classes; median_error_train/test and
    baseline_median_error with error_unit "deg" or "km"), directions: name → (D,) unit vector."""

    name: str
    kind: str
    n_fit: int
    n_test: int
    lam: float
    metrics: dict
    directions: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def split_parts(latlon: np.ndarray, cfg: ProbeConfig) -> np.ndarray:
    """(N,) int8 part of each row: 0 train, 1 validation, 2 test."""
    n = latlon.shape[0]
    rng = np.random.default_rng(cfg.seed)
    if cfg.block_m > 0:
        _, inv = np.unique(spatial_blocks(latlon, cfg.block_m), return_inverse=True)
        u = rng.random(int(inv.max()) + 1 if n else 0)[inv.reshape(-1)]
    else:
        u = rng.random(n)
    return np.where(u < cfg.test_fraction, 2, np.where(u < cfg.test_fraction + cfg.val_fraction, 1, 0)).astype(np.int8)


def target_kind(name: str, values: list, cfg: ProbeConfig) -> tuple[str | None, str]:
    """(kind, "") for a probe-able field of decoded values (None = absent), or (None, why not)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, "no values"
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
    if numbers:
        if len(set(present)) < 2:
            return None, "constant"
        return ("circular" if name in cfg.circular_fields else "numeric"), ""
    if all(isinstance(v, (str, bool)) for v in present):
        classes = len(set(present))
        if classes < 2:
            return None, "one class"
        if classes > cfg.max_classes:
            return None, f"{classes} classes (more than {cfg.max_classes}; an id?)"
        return "categorical", ""
    return None, "mixed or nested values"


@dataclass(frozen=True)
class Gram:
    """Sums over a set of rows of z = x − c (a fixed centre c): g = Σ zzᵀ (D, D), s = Σ z (D,),
    n rows; float64. Sets of disjoint rows add up."""

    g: np.ndarray
    s: np.ndarray
    n: int

    def __add__(self, other: Gram) -> Gram:
        return Gram(self.g + other.g, self.s + other.s, self.n + other.n)

    @classmethod
    def of(cls, z: np.ndarray, rows: np.ndarray, block: int = 16384) -> Gram:
        """Sums over ``rows`` of the (N, D) float32 centred rows ``z`` (float32 blocks, float64 totals)."""
        d = z.shape[1]
        g, s = np.zeros((d, d)), np.zeros(d)
        for a in range(0, rows.size, block):
            blk = z[rows[a:a + block]]
            g += (blk.T @ blk).astype(np.float64)
            s += blk.sum(axis=0, dtype=np.float64)
        return cls(g, s, int(rows.size))


class Ridge:
    """Ridge fits on the rows summed in a :class:`Gram`, every λ from one eigendecomposition of
    the centred Gram matrix Σ(z − z̄)(z − z̄)ᵀ."""

    def __init__(self, gram: Gram):
        self.mean = gram.s / max(gram.n, 1)
        self.eig, self.vec = np.linalg.eigh(gram.g - gram.n * np.outer(self.mean, self.mean))
        self.eig = np.maximum(self.eig, 0.0)
        self.scale = max(float(self.eig.mean()), 1e-30)

    def fit(self, z: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        """(W (D, T), intercept (T,)) with ŷ = z·W + intercept, for the ridge's own rows ``z``
        (n, D) and targets (n, T), at relative strength ``lam``."""
        my = y.mean(axis=0)
        zty = (z.T @ (y - my).astype(np.float32)).astype(np.float64)  # Σ(z − z̄)(y − ȳ) = Σ z (y − ȳ)
        w = self.vec @ ((self.vec.T @ zty) / (self.eig + lam * self.scale)[:, None])
        return w, my - self.mean @ w


def _predict(z: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (z @ w.astype(np.float32)).astype(np.float64) + b


def _r2(y: np.ndarray, p: np.ndarray) -> float:
    sst = float(((y - y.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((y - p) ** 2).sum()) / sst if sst > 0 else float("nan")


def _decode(kind: str, p: np.ndarray):
    if kind == "categorical":
        return p.argmax(axis=1)
    if kind == "circular":
        return np.rad2deg(np.arctan2(p[:, 0], p[:, 1])) % 360.0
    if kind == "location":
        u = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
        return np.rad2deg(np.stack([np.arcsin(np.clip(u[:, 2], -1, 1)), np.arctan2(u[:, 1], u[:, 0])], axis=1))
    return p[:, 0]


def _errors(kind: str, decoded, truth) -> np.ndarray:
    if kind == "circular":
        return np.abs((decoded - truth + 180.0) % 360.0 - 180.0)
    return haversine_km(decoded[:, 0], decoded[:, 1], truth[:, 0], truth[:, 1])


def _score(kind: str, y, p, truth) -> float:
    """Selection score on validation, larger is better."""
    return float((_decode(kind, p) == truth).mean()) if kind == "categorical" else _r2(y, p)


def _targets(kind: str, values: list, latlon: np.ndarray, rows: np.ndarray):
    """(Y (n, T) float64, truth for decoding, class names or component names)."""
    if kind == "location":
        lat, lon = np.deg2rad(latlon[rows, 0]), np.deg2rad(latlon[rows, 1])
        y = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
        return y, latlon[rows], [".x", ".y", ".z"]
    vals = [values[i] for i in rows]
    if kind == "categorical":
        classes = sorted(set(vals), key=str)
        idx = np.array([classes.index(v) for v in vals])
        return np.eye(len(classes))[idx], idx, [f"={c}" for c in classes]
    h = np.asarray(vals, dtype=np.float64)
    if kind == "circular":
        return np.stack([np.sin(np.deg2rad(h)), np.cos(np.deg2rad(h))], axis=1), h % 360.0, [".sin", ".cos"]
    return h[:, None], h, [""]


def _baseline(kind: str, y_fit: np.ndarray, truth_fit, truth_test) -> float:
    """Median test error of the constant prediction (circular / spherical mean of the fit rows)."""
    mean = y_fit.mean(axis=0, keepdims=True)
    return float(np.median(_errors(kind, _decode(kind, np.repeat(mean, len(truth_test), axis=0)), truth_test)))


def _probe(name: str, kind: str, z: np.ndarray, values, latlon, parts, cfg: ProbeConfig, cache: dict) -> ProbeResult | str:
    ok = np.ones(len(parts), dtype=bool) if kind == "location" else np.array([v is not None for v in values])
    fit_rows, val_rows = np.flatnonzero(ok & (parts == 0)), np.flatnonzero(ok & (parts == 1))
    test_rows = np.flatnonzero(ok & (parts == 2))
    if min(fit_rows.size, val_rows.size, test_rows.size) < 2:
        return f"too few rows per part (train {fit_rows.size}, validation {val_rows.size}, test {test_rows.size})"
    y, truth, names = _targets(kind, values, latlon, np.flatnonzero(ok))
    y_all = np.zeros((len(parts), y.shape[1]))
    y_all[ok] = y
    truth_all = np.zeros((len(parts), *truth.shape[1:]), dtype=truth.dtype)
    truth_all[ok] = truth

    def gram(rows):
        key = ("gram", rows.tobytes())
        if key not in cache:
            cache[key] = Gram.of(z, rows)
        return cache[key]

    def ridge(*row_sets):
        key = ("ridge", *(rows.tobytes() for rows in row_sets))
        if key not in cache:
            cache[key] = Ridge(sum((gram(rows) for rows in row_sets[1:]), gram(row_sets[0])))
        return cache[key]

    r = ridge(fit_rows)
    scores = []
    for lam in cfg.lambdas:
        w, b = r.fit(z[fit_rows], y_all[fit_rows], lam)
        scores.append(_score(kind, y_all[val_rows], _predict(z[val_rows], w, b), truth_all[val_rows]))
    lam = cfg.lambdas[int(np.nanargmax(np.where(np.isfinite(scores), scores, -np.inf)))]
    both = np.sort(np.concatenate([fit_rows, val_rows]))
    w, b = ridge(fit_rows, val_rows).fit(z[both], y_all[both], lam)
    pred = {part: _predict(z[rows], w, b) for part, rows in (("train", both), ("test", test_rows))}
    rows_of = {"train": both, "test": test_rows}
    metrics: dict = {}
    if kind == "categorical":
        fit_classes = truth_all[both]
        majority = np.bincount(fit_classes).argmax()
        for part, rows in rows_of.items():
            metrics[f"acc_{part}"] = float((_decode(kind, pred[part]) == truth_all[rows]).mean())
        metrics.update(majority_test=float((truth_all[test_rows] == majority).mean()), n_classes=len(names))
    else:
        for part, rows in rows_of.items():
            metrics[f"r2_{part}"] = _r2(y_all[rows], pred[part])
        if kind in ("circular", "location"):
            for part, rows in rows_of.items():
                metrics[f"median_error_{part}"] = float(np.median(_errors(kind, _decode(kind, pred[part]), truth_all[rows])))
            metrics["baseline_median_error"] = _baseline(kind, y_all[both], truth_all[both], truth_all[test_rows])
            metrics["error_unit"] = "deg" if kind == "circular" else "km"
    norms = np.linalg.norm(w, axis=0)
    directions = {f"{name}{suffix}": (w[:, j] / norms[j]).astype(np.float32) for j, suffix in enumerate(names) if norms[j] > 0}
    return ProbeResult(name=name, kind=kind, n_fit=int(both.size), n_test=int(test_rows.size), lam=float(lam), metrics=metrics,
                       directions=directions)


def run_probes(embeddings: np.ndarray, latlon: np.ndarray, meta: dict[str, list], cfg: ProbeConfig | None = None,
               location: bool = True) -> tuple[list[ProbeResult], dict[str, str]]:
    """Probe (N, D) embeddings for each field of ``meta`` (name → N decoded values, None =
    absent) and, with ``location``, for the (N, 2) degree positions.

    Returns (results in order: location first, then the fields; skipped field → why)."""
    cfg = cfg or ProbeConfig()
    latlon = np.asarray(latlon, dtype=np.float64)
    parts = split_parts(latlon, cfg)
    x = np.asarray(embeddings, dtype=np.float32)
    z = x - x.mean(axis=0, dtype=np.float64).astype(np.float32)  # centred once: float32 Gram blocks keep their precision
    cache: dict = {}  # row sets → Gram sums and their eigendecompositions, shared by fields without gaps
    results, skipped = [], {}
    todo = ([("location", "location", None)] if location else [])
    for name, values in meta.items():
        kind, why = target_kind(name, values, cfg)
        if kind is None:
            skipped[name] = why
        else:
            todo.append((name, kind, values))
    for name, kind, values in todo:
        out = _probe(name, kind, z, values, latlon, parts, cfg, cache)
        if isinstance(out, str):
            skipped[name] = out
        else:
            results.append(out)
    return results, skipped

"""Scoring one predictions table: every metric its columns allow, as one report entry.

Only labelled records (a finite true_lat/true_lon) are scored; unlabelled ones (null truth:
photos without a location) are left out of every metric and counted (``n_unlabelled``). A
file without any labelled record keeps its truth-free sections (localizability) over all rows.
Distance metrics where the truth is known; NLL in nats and bits/dim (tagged with its density
space) from ``log_likelihood``; localizability from ``neg_entropy_nats``; HDR calibration from
``hdr_rank``; PRDC of the predicted points (fake) against the true points (real) of the same
records; optionally country/region/city accuracies. See docs/methods.md, "Evaluation".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.admin import admin_accuracy, reverse_geocode_labels, store_admin_labels
from geopipe.pipeline.eval.calibration import calibration_table
from geopipe.pipeline.eval.failure import retrieval_section
from geopipe.pipeline.eval.metrics import SPACES, distance_metrics, localizability_summary, nll_summary
from geopipe.pipeline.eval.prdc import prdc, prdc_collapse_note

__all__ = ["ScoreOptions", "score_predictions", "baseline_entry", "report_notes", "truth_mask"]


@dataclass(frozen=True)
class ScoreOptions:
    """prdc_k / prdc_chunks: PRDC neighbours and contiguous chunks; admin accuracies when
    ``geocode`` is set or ``store`` is given (true labels from the store's ``meta/<field>``
    arrays, ``admin_fields`` maps country/region/city to field names)."""

    prdc_k: int = 3
    prdc_chunks: int = 1
    store: str | None = None
    geocode: bool = False
    admin_fields: dict = field(default_factory=lambda: {"country": "unique_country", "region": "unique_region", "city": "unique_city"})
    admin_optional: tuple = ()  # areas whose field may be absent from the store (default field names)


def _xyz(lat, lon) -> np.ndarray:
    """(N,) degrees → (N, 3) unit vectors, float64 (numpy: evaluate loads no torch)."""
    la, lo = np.deg2rad(np.asarray(lat, dtype=np.float64)), np.deg2rad(np.asarray(lon, dtype=np.float64))
    return np.stack((np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)), axis=-1)


def truth_mask(cols: dict) -> np.ndarray | None:
    if "true_lat" not in cols or "true_lon" not in cols:
        return None
    mask = np.isfinite(cols["true_lat"]) & np.isfinite(cols["true_lon"])
    return mask if mask.any() else None


def _labelled_only(cols: dict, mask) -> dict:
    """``cols`` restricted to the labelled rows ``mask`` (all rows when None: nothing to restrict to)."""
    if mask is None or mask.all():
        return cols
    return {k: ([v[i] for i in np.flatnonzero(mask)] if isinstance(v, list) else np.asarray(v)[mask]) for k, v in cols.items()}


def _prdc_section(cols: dict, mask, opts: ScoreOptions) -> dict | None:
    n = 0 if mask is None else int(mask.sum())
    size = math.ceil(n / opts.prdc_chunks)  # torch.chunk pieces; the last one is the smallest
    if n == 0 or n - size * (math.ceil(n / size) - 1) <= opts.prdc_k:
        return None  # too few records for k-NN radii in every chunk
    real = _xyz(cols["true_lat"][mask], cols["true_lon"][mask])
    fake = _xyz(cols["lat"][mask], cols["lon"][mask])
    return prdc(real, fake, k=opts.prdc_k, chunks=opts.prdc_chunks)


def _admin_section(opts: ScoreOptions, cols: dict, pred_lat, pred_lon) -> dict | None:
    if not (opts.geocode or opts.store):
        return None
    areas = tuple(opts.admin_fields)
    if opts.store:
        truth = store_admin_labels(opts.store, opts.admin_fields, cols["key"], optional=opts.admin_optional)
        areas = tuple(truth)
    elif truth_mask(cols) is not None:
        tl, tn = cols["true_lat"], cols["true_lon"]
        ok = np.isfinite(tl) & np.isfinite(tn)
        geo = reverse_geocode_labels(tl[ok], tn[ok], areas)
        truth = {a: [None] * len(tl) for a in areas}
        for a in areas:
            for i, lab in zip(np.flatnonzero(ok), geo[a]):
                truth[a][i] = lab
    else:
        return None
    return admin_accuracy(truth, reverse_geocode_labels(pred_lat, pred_lon, areas))


def _space_of(path: str, model: dict) -> str:
    space = model.get("space")
    if space not in SPACES:
        raise GeopipeError(f"{path!r}: metadata model.space is {space!r}; expected one of {sorted(SPACES)} to label its log-likelihoods")
    return space


def score_predictions(name: str, path: str, cols: dict, meta: dict, opts: ScoreOptions) -> dict:
    """One report entry for a predictions file: every metric its columns allow."""
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    mask = truth_mask(cols)
    scored = _labelled_only(cols, mask)
    method = model.get("method")
    method = method.get("name") if isinstance(method, dict) else method
    entry = {"name": name, "kind": "model", "path": path, "n": len(cols["key"]),
             "method": None if method is None else str(method), "space": model.get("space"),
             "model": model, "config": meta.get("config") if isinstance(meta.get("config"), dict) else None,
             "distance": None, "nll": None, "localizability": None, "calibration": None, "prdc": None, "admin": None,
             "n_unlabelled": len(cols["key"]) - (0 if mask is None else int(mask.sum()))}
    if mask is not None:
        entry["distance"] = distance_metrics(cols["lat"], cols["lon"], cols["true_lat"], cols["true_lon"])
    if "log_likelihood" in cols and np.isfinite(cols["log_likelihood"]).any():
        entry["nll"] = nll_summary(cols["log_likelihood"], _space_of(path, model))
    if "neg_entropy_nats" in scored and np.isfinite(scored["neg_entropy_nats"]).any():
        entry["localizability"] = localizability_summary(scored["neg_entropy_nats"], _space_of(path, model))
    if "hdr_rank" in cols and np.isfinite(cols["hdr_rank"]).any():
        entry["calibration"] = calibration_table(cols["hdr_rank"])
    entry["prdc"] = _prdc_section(cols, mask, opts)
    entry["admin"] = _admin_section(opts, scored, scored["lat"], scored["lon"])
    retrieval = retrieval_section(path, cols) if mask is not None else None
    if retrieval is not None:  # an optional section: files of generative models have no top-K
        entry["retrieval"] = retrieval
    return entry


def baseline_entry(latlon: tuple[float, float], cols: dict, opts: ScoreOptions) -> dict:
    n = len(cols["key"])
    lat, lon = np.full(n, float(latlon[0])), np.full(n, float(latlon[1]))
    mask = truth_mask(cols)
    const = {**cols, "lat": lat, "lon": lon}
    scored = _labelled_only(const, mask)
    return {"name": "constant baseline", "kind": "baseline", "path": None, "n": n, "method": "constant", "space": None,
            "model": {"method": "constant", "latlon": [float(latlon[0]), float(latlon[1])]}, "config": None,
            "distance": distance_metrics(lat, lon, cols["true_lat"], cols["true_lon"]) if mask is not None else None,
            "nll": None, "localizability": None, "calibration": None, "prdc": _prdc_section(const, mask, opts),
            "admin": _admin_section(opts, scored, scored["lat"], scored["lon"]),
            "n_unlabelled": n - (0 if mask is None else int(mask.sum()))}


def report_notes(entries: list[dict]) -> list[str]:
    notes = []
    spaces = {e["nll"]["space"] for e in entries if e["nll"]}
    if spaces:
        notes.append("nll_bits_per_dim = -mean log p / (3 ln 2) (bits per ambient dimension); uniform on S² = 1.2172.")
    if len(spaces) > 1:
        notes.append("S² densities (per steradian) and R³ densities (per unit volume) are not comparable.")
    if any(e["prdc"] for e in entries):
        notes.append("PRDC: real = true locations, fake = predicted points of the same records; great-circle k-NN.")
    collapsed = prdc_collapse_note(entries)
    if collapsed:
        notes.append(collapsed)
    return notes

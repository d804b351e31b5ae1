"""Evaluate stage: predictions Parquet file(s) → metrics report JSON (schemas.report) + text table.

Every metric a file's columns allow is computed (spec §9, A6, A8–A11): distance metrics where
the truth is known; NLL in nats and bits/dim (tagged with its density space) from
``log_likelihood``; localizability from ``neg_entropy_nats``; HDR calibration from
``hdr_rank``; PRDC of the predicted points (fake) against the true points (real) of the same
records; optionally country/region/city accuracies. Several files give one row per model, plus
a "constant baseline" row when ``baseline_latlon`` is set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.admin import admin_accuracy, reverse_geocode_labels, store_admin_labels
from pipeline.calibration import calibration_table
from pipeline.errors import GeopipeError
from pipeline.geometry import latlon_to_xyz
from pipeline.metrics import SPACES, constant_baseline, distance_metrics, localizability_summary, nll_summary
from pipeline.prdc import prdc
from pipeline.provenance import provenance
from pipeline.report_table import format_table
from schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA_ID
from schemas.report import COMPARISON_COLUMNS, REPORT_SCHEMA_ID, validate_report

__all__ = ["EvaluateConfig", "EvaluateResult", "run_evaluate", "store_mean_direction", "format_table"]

_REQUIRED = ("key", "lat", "lon")
_FLOATS = ("lat", "lon", "true_lat", "true_lon", "log_likelihood", "neg_entropy_nats", "hdr_rank")


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``geopipe evaluate``.

    predictions: one or more predictions Parquet paths; names: a label per file (default: file
    stem); out: JSON report path (None: not written); prdc_k / prdc_chunks: PRDC neighbours and
    contiguous chunks (A11: 3 and 1 = whole set); baseline_latlon: (lat, lon) degrees of a
    constant prediction scored on the first file's truths. Admin accuracies are computed when
    ``geocode`` is set or ``store`` is given: predicted labels by reverse geocoding the predicted
    points (needs ``pip install geopipe[geocode]``), true labels from the store's ``meta/<field>``
    arrays joined on key (or, without a store, by reverse geocoding the true points).
    """

    predictions: tuple[str, ...]
    out: str | None = None
    names: tuple[str, ...] | None = None
    prdc_k: int = 3
    prdc_chunks: int = 1
    store: str | None = None
    country_field: str = "unique_country"
    region_field: str = "unique_region"
    city_field: str = "unique_city"
    geocode: bool = False
    baseline_latlon: tuple[float, float] | None = None

    def __post_init__(self):
        for name in ("predictions", "names", "baseline_latlon"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.predictions, str) or not self.predictions:
            raise ValueError("evaluate: give one or more predictions files as a tuple of paths")
        if self.names is not None and len(self.names) != len(self.predictions):
            raise ValueError(f"evaluate: {len(self.names)} names for {len(self.predictions)} predictions files; give one name per file")
        for name in ("prdc_k", "prdc_chunks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"evaluate: {name} must be a positive integer, got {v!r}")
        if self.baseline_latlon is not None and len(self.baseline_latlon) != 2:
            raise ValueError(f"evaluate: baseline_latlon must be (lat, lon) in degrees, got {self.baseline_latlon!r}")

    def admin_fields(self) -> dict[str, str]:
        return {"country": self.country_field, "region": self.region_field, "city": self.city_field}


@dataclass(frozen=True)
class EvaluateResult:
    """``reports``: one ``geopipe.report/1`` entry per file (+ baseline); ``table``: plain text."""

    reports: list[dict]
    table: str
    out: str | None = None


def _read_predictions(path: str) -> tuple[dict, dict]:
    """(columns {name: (N,) array | list}, metadata dict) of a predictions file, or GeopipeError."""
    if not os.path.isfile(path):
        raise GeopipeError(f"predictions file {path!r} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise GeopipeError(f"{path!r} is not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    raw = (pf.schema_arrow.metadata or {}).get(METADATA_KEY)
    missing = [c for c in _REQUIRED if c not in pf.schema_arrow.names]
    if raw is None or missing:
        why = f"missing columns {missing}" if missing else f"no {METADATA_KEY.decode()!r} metadata"
        raise GeopipeError(f"{path!r} is not a geopipe predictions file ({why}); write it with `geopipe predict`")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise GeopipeError(f"{path!r}: the {METADATA_KEY.decode()!r} metadata is not valid JSON") from None
    if meta.get("schema", PREDICTIONS_SCHEMA_ID) != PREDICTIONS_SCHEMA_ID:
        raise GeopipeError(f"{path!r} has predictions schema {meta.get('schema')!r}; this geopipe reads {PREDICTIONS_SCHEMA_ID!r}")
    names = [c for c in ("key", *_FLOATS) if c in pf.schema_arrow.names]
    table = pf.read(columns=names)
    cols: dict = {"key": [str(k) for k in table.column("key").to_pylist()]}
    for name in names[1:]:
        try:
            cols[name] = table.column(name).cast(pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowException:
            raise GeopipeError(f"{path!r}: column {name!r} is not numeric") from None
    return cols, meta


def _xyz(lat, lon) -> np.ndarray:
    return latlon_to_xyz(torch.from_numpy(np.stack([lat, lon], axis=1).astype(np.float64))).numpy()


def _truth_mask(cols: dict) -> np.ndarray | None:
    if "true_lat" not in cols or "true_lon" not in cols:
        return None
    mask = np.isfinite(cols["true_lat"]) & np.isfinite(cols["true_lon"])
    return mask if mask.any() else None


def _prdc_section(cols: dict, mask, cfg: EvaluateConfig) -> dict | None:
    n = 0 if mask is None else int(mask.sum())
    size = math.ceil(n / cfg.prdc_chunks)  # torch.chunk pieces; the last one is the smallest
    if n == 0 or n - size * (math.ceil(n / size) - 1) <= cfg.prdc_k:
        return None  # too few records for k-NN radii in every chunk
    real = _xyz(cols["true_lat"][mask], cols["true_lon"][mask])
    fake = _xyz(cols["lat"][mask], cols["lon"][mask])
    return prdc(real, fake, k=cfg.prdc_k, chunks=cfg.prdc_chunks)


def _admin_section(cfg: EvaluateConfig, cols: dict, pred_lat, pred_lon) -> dict | None:
    if not (cfg.geocode or cfg.store):
        return None
    areas = tuple(cfg.admin_fields())
    if cfg.store:
        truth = store_admin_labels(cfg.store, cfg.admin_fields(), cols["key"])
    elif _truth_mask(cols) is not None:
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


def _model_entry(name: str, path: str, cfg: EvaluateConfig) -> tuple[dict, dict]:
    cols, meta = _read_predictions(path)
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    mask = _truth_mask(cols)
    method = model.get("method")
    method = method.get("name") if isinstance(method, dict) else method
    entry = {"name": name, "kind": "model", "path": path, "n": len(cols["key"]),
             "method": None if method is None else str(method), "space": model.get("space"),
             "model": model, "config": meta.get("config") if isinstance(meta.get("config"), dict) else None,
             "distance": None, "nll": None, "localizability": None, "calibration": None, "prdc": None, "admin": None}
    if mask is not None:
        entry["distance"] = distance_metrics(cols["lat"], cols["lon"], cols["true_lat"], cols["true_lon"])
    if "log_likelihood" in cols and np.isfinite(cols["log_likelihood"]).any():
        entry["nll"] = nll_summary(cols["log_likelihood"], _space_of(path, model))
    if "neg_entropy_nats" in cols and np.isfinite(cols["neg_entropy_nats"]).any():
        entry["localizability"] = localizability_summary(cols["neg_entropy_nats"], _space_of(path, model))
    if "hdr_rank" in cols and np.isfinite(cols["hdr_rank"]).any():
        entry["calibration"] = calibration_table(cols["hdr_rank"])
    entry["prdc"] = _prdc_section(cols, mask, cfg)
    entry["admin"] = _admin_section(cfg, cols, cols["lat"], cols["lon"])
    return entry, cols


def _baseline_entry(latlon: tuple[float, float], cols: dict, cfg: EvaluateConfig) -> dict:
    n = len(cols["key"])
    lat, lon = np.full(n, float(latlon[0])), np.full(n, float(latlon[1]))
    mask = _truth_mask(cols)
    const = {**cols, "lat": lat, "lon": lon}
    return {"name": "constant baseline", "kind": "baseline", "path": None, "n": n, "method": "constant", "space": None,
            "model": {"method": "constant", "latlon": [float(latlon[0]), float(latlon[1])]}, "config": None,
            "distance": distance_metrics(lat, lon, cols["true_lat"], cols["true_lon"]) if mask is not None else None,
            "nll": None, "localizability": None, "calibration": None, "prdc": _prdc_section(const, mask, cfg),
            "admin": _admin_section(cfg, cols, lat, lon)}


def _comparison_row(e: dict) -> dict:
    g = lambda s, k: (e.get(s) or {}).get(k)  # noqa: E731
    row = {"name": e["name"], "kind": e["kind"], "method": e["method"], "space": e["space"], "n": e["n"],
           "nll_bits_per_dim": g("nll", "nll_bits_per_dim"), "calibration_error": g("calibration", "error"),
           "mean_neg_entropy_nats": g("localizability", "mean_neg_entropy_nats")}
    row.update({k: g("distance", k) for k in COMPARISON_COLUMNS if k.startswith(("geoscore", "mean_km", "median_km", "acc_"))})
    row.update({k: g("prdc", k) for k in ("precision", "recall", "density", "coverage")})
    return {k: row[k] for k in COMPARISON_COLUMNS}


def _notes(entries: list[dict]) -> list[str]:
    notes = []
    spaces = {e["nll"]["space"] for e in entries if e["nll"]}
    if spaces:
        notes.append("nll_bits_per_dim = -mean log p / (3 ln 2) (bits per ambient dimension); uniform on S² = 1.2172.")
    if len(spaces) > 1:
        notes.append("S² densities (per steradian) and R³ densities (per unit volume) are not comparable.")
    if any(e["prdc"] for e in entries):
        notes.append("PRDC: real = true locations, fake = predicted points of the same records; great-circle k-NN.")
    return notes


def _json_safe(value):
    """Non-finite floats (e.g. a −inf log-likelihood) become null: strict JSON has no NaN/inf."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _labels(cfg: EvaluateConfig) -> list[str]:
    if cfg.names is not None:
        return [str(n) for n in cfg.names]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in cfg.predictions]
    return [s if stems.count(s) == 1 else p for s, p in zip(stems, cfg.predictions)]


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score every predictions file of ``cfg``; write the JSON report when ``cfg.out`` is set."""
    entries, first_truth = [], None
    for name, path in zip(_labels(cfg), cfg.predictions):
        try:
            entry, cols = _model_entry(name, str(path), cfg)
        except ValueError as exc:  # invalid values inside a well-formed file (e.g. NaN predictions)
            raise GeopipeError(f"{path!r}: {exc}") from None
        entries.append(entry)
        if first_truth is None and _truth_mask(cols) is not None:
            first_truth = cols
    if cfg.baseline_latlon is not None:
        if first_truth is None:
            raise GeopipeError("a constant baseline needs true coordinates, but no predictions file has true_lat/true_lon")
        entries.append(_baseline_entry(cfg.baseline_latlon, first_truth, cfg))
    entries = _json_safe(entries)
    doc = {"schema": REPORT_SCHEMA_ID, "version": provenance()["version"], "reports": entries,
           "comparison": [_comparison_row(e) for e in entries], "notes": _notes(entries)}
    problems = validate_report(doc)
    if problems:  # a bug here, not a user error
        raise RuntimeError(f"evaluate built an invalid report: {problems}")
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2, allow_nan=False, ensure_ascii=False, default=str)
            fh.write("\n")
    return EvaluateResult(reports=entries, table=format_table(entries), out=cfg.out)


def store_mean_direction(store: str) -> tuple[float, float]:
    """Constant-baseline point: mean direction (lat, lon degrees) of an embedding store's ``latlon``."""
    import zarr

    try:
        group = zarr.open_group(store, mode="r")
        rows = int(group.attrs.get("rows", group["latlon"].shape[0]))
        latlon = np.asarray(group["latlon"][:rows], dtype=np.float64)
    except Exception as exc:  # zarr raises several types for a missing / foreign path
        raise GeopipeError(f"cannot read coordinates of embedding store {store!r} ({type(exc).__name__}: {exc})") from None
    try:
        return constant_baseline(latlon)
    except ValueError as exc:
        raise GeopipeError(f"store {store!r}: {exc}") from None

"""Evaluate stage: predictions Parquet file(s) → metrics report JSON (geopipe.schemas.report) + text table.

Every metric a file's columns allow is computed (docs/methods.md#metrics) over its labelled
records (those with a true location; unlabelled ones are left out, counted in the report's
``n_unlabelled`` and in one line on stderr): distance metrics; NLL in nats and bits/dim
(tagged with its density space) from ``log_likelihood``; localizability from ``neg_entropy_nats``; HDR calibration from
``hdr_rank``; PRDC of the predicted points (fake) against the true points (real) of the same
records; optionally country/region/city accuracies. Several files give one row per model, plus
a "constant baseline" row when ``baseline_latlon`` is set. Retrieval files add Recall@K. With
``uncertainty``, a failure-prediction table (one row per uncertainty score column and failure
definition, see :mod:`geopipe.pipeline.eval.failure`) and, with ``plots_dir``, sparsification and
reliability plots (PNG). A record fails when its error exceeds ``failure_km`` (default 750 km, the
country scale of the accuracy radii; a city-scale 25 km fails every record of a coarse model).
A failure definition that leaves one class empty (every record fails, or none does) ranks
nothing: a warning line on stderr says so and suggests the median error, and no plot is drawn.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.artifacts.outputs import check_output
from geopipe.pipeline.artifacts.predictions import read_predictions
from geopipe.pipeline.artifacts.report import build_report, json_safe, write_report
from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.eval.failure import FailureOptions, failure_rows, format_failure_table, rank_failure_scores
from geopipe.pipeline.eval.metrics import constant_baseline
from geopipe.pipeline.eval.score import ScoreOptions, baseline_entry, report_notes, score_predictions, truth_mask
from geopipe.pipeline.eval.table import format_table

__all__ = ["EvaluateConfig", "EvaluateResult", "run_evaluate", "store_mean_direction", "format_table"]


@dataclass(frozen=True)
class EvaluateConfig:
    """Options of ``geopipe evaluate``.

    predictions: one or more predictions Parquet paths; names: a label per file (default: file
    stem); failure_km: with ``uncertainty``, a record fails when its great-circle error exceeds
    this many km (default 750, stated once in :class:`~geopipe.pipeline.eval.failure.FailureOptions`);
    out: JSON report path (None: not written); prdc_k / prdc_chunks: PRDC neighbours and
    contiguous chunks (3 and 1 = whole set, as in the paper); baseline_latlon: (lat, lon) degrees of a
    constant prediction scored on the first file's truths. Admin accuracies are computed when
    ``geocode`` is set or ``store`` is given: predicted labels by reverse geocoding the predicted
    points (needs ``pip install 'geopipe-geolocation[geocode]'``), true labels from the store's
    ``meta/<field>`` arrays joined on key (or, without a store, by reverse geocoding the true
    points). Any subset of the areas works: a field left None is scored when the store has
    ``unique_<area>``; a field given must exist. overwrite: replace an existing ``out`` (else
    refused before any scoring).
    """

    predictions: tuple[str, ...]
    out: str | None = None
    names: tuple[str, ...] | None = None
    prdc_k: int = 3
    prdc_chunks: int = 1
    store: str | None = None
    country_field: str | None = None  # None: "unique_country" when the store has it
    region_field: str | None = None
    city_field: str | None = None
    geocode: bool = False
    baseline_latlon: tuple[float, float] | None = None
    uncertainty: bool = False
    failure_km: float = FailureOptions.failure_km
    plots_dir: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for name in ("predictions", "names", "baseline_latlon"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.predictions, str) or not self.predictions:
            raise ConfigError("evaluate: give one or more predictions files as a tuple of paths")
        if self.names is not None and len(self.names) != len(self.predictions):
            raise ConfigError(f"evaluate: {len(self.names)} names for {len(self.predictions)} predictions files; give one name per file")
        for name in ("prdc_k", "prdc_chunks"):
            check_int(getattr(self, name), name, 1, where="evaluate")
        fk = self.failure_km
        if isinstance(fk, bool) or not isinstance(fk, (int, float)) or not (math.isfinite(fk) and fk > 0):
            raise ConfigError(f"evaluate: --failure-km must be a finite distance in km > 0, got {fk!r}")
        if self.plots_dir is not None and os.path.exists(self.plots_dir) and not os.path.isdir(self.plots_dir):
            raise ConfigError(f"evaluate: --plots {self.plots_dir!r} is a file; give a folder for the PNGs")
        if self.baseline_latlon is not None and len(self.baseline_latlon) != 2:
            raise ConfigError(f"evaluate: baseline_latlon must be (lat, lon) in degrees, got {self.baseline_latlon!r}")

    def admin_fields(self) -> dict[str, str]:
        """Area → store meta field: the one given, else ``unique_<area>``."""
        given = {"country": self.country_field, "region": self.region_field, "city": self.city_field}
        return {area: f if f is not None else f"unique_{area}" for area, f in given.items()}

    def admin_optional(self) -> tuple[str, ...]:
        """Areas without a field given: scored only when the store has the default field."""
        given = {"country": self.country_field, "region": self.region_field, "city": self.city_field}
        return tuple(area for area, f in given.items() if f is None)


@dataclass(frozen=True)
class EvaluateResult:
    """``reports``: one ``geopipe.report/1`` entry per file (+ baseline); ``table``: plain text."""

    reports: list[dict]
    table: str
    out: str | None = None
    uncertainty: list[dict] | None = None
    uncertainty_table: str | None = None
    plots: tuple[str, ...] = ()


def _labels(cfg: EvaluateConfig) -> list[str]:
    if cfg.names is not None:
        return [str(n) for n in cfg.names]
    stems = [os.path.splitext(os.path.basename(p))[0] for p in cfg.predictions]
    return [s if stems.count(s) == 1 else p for s, p in zip(stems, cfg.predictions)]


def run_evaluate(cfg: EvaluateConfig) -> EvaluateResult:
    """Score every predictions file of ``cfg``; write the JSON report when ``cfg.out`` is set."""
    if cfg.out:
        check_output(cfg.out, cfg.overwrite, example="report.json")
    if cfg.uncertainty and cfg.plots_dir:  # before any scoring: a folder that cannot be made is one line now
        fsio.makedirs(cfg.plots_dir, "plots folder")
    opts = ScoreOptions(prdc_k=cfg.prdc_k, prdc_chunks=cfg.prdc_chunks, store=cfg.store, geocode=cfg.geocode,
                        admin_fields=cfg.admin_fields(), admin_optional=cfg.admin_optional())
    entries, first_truth, failures, skipped = [], None, [], []
    for name, path in zip(_labels(cfg), cfg.predictions):
        cols, meta = read_predictions(str(path))
        try:
            entries.append(score_predictions(name, str(path), cols, meta, opts))
            if cfg.uncertainty:
                failures += failure_rows(name, str(path), cols, FailureOptions(failure_km=cfg.failure_km), skipped)
        except ValueError as exc:  # invalid values inside a well-formed file (e.g. NaN predictions)
            raise GeopipeError(f"{path!r}: {exc}") from None
        if first_truth is None and truth_mask(cols) is not None:
            first_truth = cols
    if cfg.baseline_latlon is not None:
        if first_truth is None:
            raise GeopipeError("a constant baseline needs true coordinates, but no predictions file has true_lat/true_lon")
        entries.append(baseline_entry(cfg.baseline_latlon, first_truth, opts))
    for e in entries:  # never silently: how many records each file left out
        if e.get("n_unlabelled"):
            print(f"geopipe: evaluate: {_left_out(e)}", file=sys.stderr)
    doc = build_report(entries, report_notes(entries), provenance()["version"])
    plots: tuple[str, ...] = ()
    if cfg.uncertainty:
        ranking = rank_failure_scores(failures)  # also marks each row's rank in its group
        doc["uncertainty"] = json_safe(failures)
        doc["uncertainty_ranking"] = json_safe(ranking)
        doc["uncertainty_not_scored"] = [{"model": m, "score": sc, "n": n} for m, sc, n in skipped]
        empty = _one_class_groups(failures)
        for line in _one_class_warnings(failures, empty, entries):
            print(f"geopipe: evaluate: warning: {line}", file=sys.stderr)
        drawn = [r for r in failures if (r["failure"], r["model"]) not in empty]
        plots = _failure_plots(drawn, cfg.plots_dir) if cfg.plots_dir and drawn else ()
    if cfg.out:
        write_report(doc, cfg.out)
    return EvaluateResult(reports=doc["reports"], table=format_table(doc["reports"]), out=cfg.out,
                          uncertainty=doc.get("uncertainty"),
                          uncertainty_table=format_failure_table(failures, skipped) if cfg.uncertainty else None, plots=plots)


def _left_out(entry: dict) -> str:
    """One line on the unlabelled records (no true location) a report entry left out."""
    n, u = entry["n"], entry["n_unlabelled"]
    if u == n:
        return f"{entry['name']}: all {n} records are unlabelled (no true location): no distance, NLL, calibration or PRDC"
    return f"{entry['name']}: scored {n - u} labelled records; left out {u} unlabelled ones (no true location)"


def _one_class_groups(rows: list[dict]) -> set[tuple[str, str]]:
    """(failure definition, model) groups whose every row has one class only (accuracy 0 or 1)."""
    groups: dict[tuple[str, str], bool] = {}
    for r in rows:
        key = (r["failure"], r["model"])
        groups[key] = groups.get(key, True) and r["accuracy"] in (0.0, 1.0)
    return {key for key, one_class in groups.items() if one_class}


def _one_class_warnings(rows: list[dict], groups: set[tuple[str, str]], entries: list[dict]) -> list[str]:
    """One line per one-class group: which class is empty and, for an ``error <= X km``
    definition, the model's median error as a threshold that splits its records."""
    median = {e["name"]: (e.get("distance") or {}).get("median_km") for e in entries}
    lines = []
    for label, model in sorted(groups):
        r = next(r for r in rows if r["failure"] == label and r["model"] == model)
        what = "fails" if r["accuracy"] == 0.0 else "passes"
        hint = ""
        if label.startswith("error <=") and median.get(model) is not None:
            m = median[model]
            hint = f"; try --failure-km near its median error, {m:.0f} km" if m >= 10 else f"; try --failure-km near its median error, {m:.2g} km"
        lines.append(f"{model}: every one of its {r['n']} records {what} '{label}': one class only, the uncertainty scores have "
                     f"nothing to rank (AUROC/AUPRC undefined, flat curves; no plot drawn){hint}")
    return lines


def _failure_plots(rows: list[dict], folder: str) -> tuple[str, ...]:
    """One sparsification and one reliability PNG per (failure definition, model) in ``folder``:
    the oracle and random references belong to one model's records."""
    from geopipe.pipeline.viz.failure_plots import render_reliability_plot, render_sparsification_plot

    fsio.makedirs(folder, "plots folder")
    slug = lambda text: "".join(ch if ch.isalnum() else "_" for ch in text.replace("<=", "le").replace("@", "at")).strip("_")  # noqa: E731
    paths = []
    for label, model in dict.fromkeys((r["failure"], r["model"]) for r in rows):
        group = [r for r in rows if r["failure"] == label and r["model"] == model]
        stem = f"{slug(model)}_{slug(label)}"
        paths.append(render_sparsification_plot(os.path.join(folder, f"sparsification_{stem}.png"), group,
                                                title=f"Sparsification: {model} ({label})"))
        paths.append(render_reliability_plot(os.path.join(folder, f"reliability_{stem}.png"), group,
                                             title=f"Reliability: {model} ({label})"))
    return tuple(paths)


def store_mean_direction(store: str) -> tuple[float, float]:
    """Constant-baseline point: mean direction (lat, lon degrees) of an embedding store's labelled
    ``latlon`` rows (unlabelled records, NaN, have no location to average)."""
    import zarr

    try:
        group = zarr.open_group(store, mode="r")
        rows = int(group.attrs.get("rows", group["latlon"].shape[0]))
        latlon = np.asarray(group["latlon"][:rows], dtype=np.float64)
    except Exception as exc:  # zarr raises several types for a missing / foreign path
        raise GeopipeError(f"cannot read coordinates of embedding store {store!r} ({type(exc).__name__}: {exc})") from None
    labelled = np.isfinite(latlon).all(axis=1) | ~np.isnan(latlon).all(axis=1)  # (NaN, NaN) rows out; damage stays in
    if not labelled.any() and len(latlon):
        raise GeopipeError(f"store {store!r} has no labelled records: no mean location for a constant baseline")
    try:
        return constant_baseline(latlon[labelled])
    except ValueError as exc:
        raise GeopipeError(f"store {store!r}: {exc}") from None

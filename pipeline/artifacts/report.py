"""The evaluation report (``schemas.report``): assemble, validate, write atomically, read back."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.limits import load_json
from geopipe.schemas.report import COMPARISON_COLUMNS, REPORT_SCHEMA_ID, validate_report

__all__ = ["json_safe", "comparison_row", "build_report", "write_report", "read_report"]


def json_safe(value):
    """Non-finite floats (e.g. a −inf log-likelihood) become null: strict JSON has no NaN/inf."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def comparison_row(entry: dict) -> dict:
    """One row of the report's comparison table (:data:`COMPARISON_COLUMNS`) from a report entry."""
    def get(section, key):
        return (entry.get(section) or {}).get(key)

    row = {"name": entry["name"], "kind": entry["kind"], "method": entry["method"], "space": entry["space"], "n": entry["n"],
           "nll_bits_per_dim": get("nll", "nll_bits_per_dim"), "calibration_error": get("calibration", "error"),
           "mean_neg_entropy_nats": get("localizability", "mean_neg_entropy_nats")}
    row.update({k: get("distance", k) for k in COMPARISON_COLUMNS if k.startswith(("geoscore", "mean_km", "median_km", "acc_"))})
    row.update({k: get("prdc", k) for k in ("precision", "recall", "density", "coverage")})
    return {k: row[k] for k in COMPARISON_COLUMNS}


def build_report(entries: Sequence[dict], notes: Sequence[str], version: str) -> dict:
    """The report document; raises RuntimeError if it breaks the schema (a bug, not a user error)."""
    entries = json_safe(list(entries))
    doc = {"schema": REPORT_SCHEMA_ID, "version": version, "reports": entries,
           "comparison": [comparison_row(e) for e in entries], "notes": list(notes)}
    problems = validate_report(doc)
    if problems:
        raise RuntimeError(f"evaluate built an invalid report: {problems}")
    return doc


def write_report(doc: dict, path: str) -> None:
    """Write the report JSON atomically (a kill mid-write leaves the previous report intact)."""
    if os.path.isdir(path):
        raise GeopipeError(f"output {path!r} is a directory; give a file path such as {os.path.join(path, 'report.json')!r}")
    text = json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False, default=str) + "\n"
    fsio.write_atomic(path, text.encode("utf-8"))


def read_report(path: str) -> dict:
    """A report written by :func:`write_report`, or GeopipeError naming the file."""
    if not fsio.exists(path):
        raise GeopipeError(f"report {path!r} does not exist; write it with `geopipe evaluate ... --out {path}`")
    doc = load_json(path, "report")  # size, depth and encoding limits: ConfigError naming the file
    if not isinstance(doc, dict) or doc.get("schema") != REPORT_SCHEMA_ID or not isinstance(doc.get("reports"), list):
        raise GeopipeError(f"{path!r} is not a geopipe evaluation report (schema {REPORT_SCHEMA_ID!r})")
    return doc

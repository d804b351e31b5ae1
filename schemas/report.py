"""Evaluation report (JSON, schema ``geopipe.report/1``) written by the ``evaluate`` stage.

Document::

    {
      "schema": "geopipe.report/1",
      "version": "0.1.0",                       # geopipe package version ("unknown" if not installed)
      "reports": [ENTRY, …],                    # one per predictions file, then the baseline if any
      "comparison": [ROW, …],                   # one flat row per entry, same order (Tables 1–2 style)
      "notes": ["…"]                            # caveats, e.g. S² vs R³ densities not comparable
    }

ENTRY (a section is ``null`` when its input columns are absent or empty)::

    name            str     label of the model (file stem unless named)
    kind            str     "model" | "baseline"
    path            str|null  predictions file (null for the constant baseline)
    n               int     rows in the file
    n_unlabelled    int     (newer reports) of them, rows without a known truth (unlabelled records),
                            left out of every metric (a file with no labelled row keeps localizability
                            over all its rows); the metrics are over the n − n_unlabelled others
    method, space   str|null  model["method"], model["space"] ("sphere" | "r3") from the file metadata
    model, config   dict|null  the file's metadata "model" and "config" objects
    distance        {n, mean_km, median_km, geoscore, acc_1km, acc_25km, acc_200km, acc_750km, acc_2500km}
                    km; GeoScore = mean 5000·exp(−d/1492.7); acc_r = fraction with d < r (fractions, not %)
    nll             {n, space, unit, mean_log_likelihood_nats, nll_nats, nll_bits_per_dim}
                    nll_bits_per_dim = −mean log p / (3 ln 2); uniform on S² = 1.2172
    localizability  {n, mean_neg_entropy_nats, median_neg_entropy_nats, mean_entropy_bits, median_effective_area_km2}
                    −H of S² models per steradian, of R³ models per unit volume (effective area null)
    calibration     {n, levels, coverage, error}  HDR coverage(p) = mean(hdr_rank ≤ p); error = mean |coverage − p|
    prdc            {precision, recall, density, coverage, k, chunks, n_real, n_fake}  (real = truths, fake = predictions;
                    newer reports add collapsed_real: the fraction of truths whose k-th neighbour truth is within 25 m)
    admin           {area: {n, accuracy}}  area ∈ country / region / sub-region / city; n counts known true labels

    retrieval       (optional) Recall@K of retrieval files, see OPTIONAL_ENTRY_KEYS (newer reports add
                    n_unlabelled: queries without a truth, left out of Recall@K)

ROW: the keys of :data:`COMPARISON_COLUMNS`, numbers or null. Optional top level
"uncertainty": failure-prediction rows (model, score, failure, n, ausc, ause, aurg, spearman,
auroc, auprc, curves) written by ``geopipe evaluate --uncertainty``; "uncertainty_not_scored":
score columns without enough finite values for a row (model, score, n); "uncertainty_ranking": per
(failure, model) the scores ranked by AUROC then AURG (order, auroc, aurg, winner, runner_up, margins).
"""

from __future__ import annotations

__all__ = [
    "REPORT_SCHEMA_ID",
    "REPORT_KEYS",
    "ENTRY_KEYS",
    "OPTIONAL_ENTRY_KEYS",
    "OPTIONAL_REPORT_KEYS",
    "ENTRY_KINDS",
    "SECTION_KEYS",
    "COMPARISON_COLUMNS",
    "validate_report",
]

REPORT_SCHEMA_ID = "geopipe.report/1"

#: Top-level keys and their JSON types.
REPORT_KEYS: dict[str, type] = {"schema": str, "version": str, "reports": list, "comparison": list, "notes": list}

#: Keys of one report entry and their JSON types (a tuple means "one of"; ``type(None)`` = null).
_NULL = type(None)
ENTRY_KEYS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "kind": (str,),
    "path": (str, _NULL),
    "n": (int,),
    "method": (str, _NULL),
    "space": (str, _NULL),
    "model": (dict, _NULL),
    "config": (dict, _NULL),
    "distance": (dict, _NULL),
    "nll": (dict, _NULL),
    "localizability": (dict, _NULL),
    "calibration": (dict, _NULL),
    "prdc": (dict, _NULL),
    "admin": (dict, _NULL),
}
#: Entry keys that may be absent (older reports lack them).
OPTIONAL_ENTRY_KEYS: dict[str, tuple[type, ...]] = {
    "retrieval": (dict, _NULL),  # Recall@K of retrieval files: {radius_m, n, n_unanswerable, ks, recall, recall_all, recall_km}
    "n_unlabelled": (int,),  # rows without a true location (null truth), left out of the metrics
}
#: Top-level keys that may be absent: "uncertainty" = failure-prediction rows of ``evaluate --uncertainty``.
OPTIONAL_REPORT_KEYS: dict[str, type] = {"uncertainty": list, "uncertainty_not_scored": list, "uncertainty_ranking": list}
ENTRY_KINDS: tuple[str, ...] = ("model", "baseline")

#: Keys each non-null metric section must hold.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "distance": ("n", "mean_km", "median_km", "geoscore", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km"),
    "nll": ("n", "space", "unit", "mean_log_likelihood_nats", "nll_nats", "nll_bits_per_dim"),
    "localizability": ("n", "mean_neg_entropy_nats", "median_neg_entropy_nats", "mean_entropy_bits", "median_effective_area_km2"),
    "calibration": ("n", "levels", "coverage", "error"),
    "prdc": ("precision", "recall", "density", "coverage", "k", "chunks", "n_real", "n_fake"),
}

#: Columns of one comparison row (one row per entry).
COMPARISON_COLUMNS: tuple[str, ...] = (
    "name", "kind", "method", "space", "n",
    "geoscore", "mean_km", "median_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km", "acc_2500km",
    "nll_bits_per_dim", "precision", "recall", "density", "coverage", "calibration_error", "mean_neg_entropy_nats",
)


def _type_ok(value, kinds: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in kinds:
        return False
    return isinstance(value, kinds)


def _entry_problems(i: int, entry) -> list[str]:
    if not isinstance(entry, dict):
        return [f"reports[{i}] must be an object"]
    problems = [f"reports[{i}] lacks {k!r}" for k in ENTRY_KEYS if k not in entry]
    problems += [f"reports[{i}] has unknown key {k!r}" for k in entry if k not in ENTRY_KEYS and k not in OPTIONAL_ENTRY_KEYS]
    for key, kinds in {**ENTRY_KEYS, **OPTIONAL_ENTRY_KEYS}.items():
        if key in entry and not _type_ok(entry[key], kinds):
            problems.append(f"reports[{i}].{key} has type {type(entry[key]).__name__}")
    if entry.get("kind") not in ENTRY_KINDS:
        problems.append(f"reports[{i}].kind must be one of {list(ENTRY_KINDS)}")
    for section, keys in SECTION_KEYS.items():
        if isinstance(entry.get(section), dict):
            missing = [k for k in keys if k not in entry[section]]
            if missing:
                problems.append(f"reports[{i}].{section} lacks {missing}")
    admin = entry.get("admin")
    if isinstance(admin, dict):
        for area, val in admin.items():
            if not (isinstance(val, dict) and "n" in val and "accuracy" in val):
                problems.append(f"reports[{i}].admin[{area!r}] must be {{'n', 'accuracy'}}")
    return problems


def validate_report(report) -> list[str]:
    """Return human-readable problems with a report document (empty list = valid)."""
    if not isinstance(report, dict):
        return ["report must be a JSON object"]
    problems: list[str] = []
    for key, kind in REPORT_KEYS.items():
        if key not in report:
            problems.append(f"missing key {key!r}")
        elif not isinstance(report[key], kind):
            problems.append(f"key {key!r} must be {kind.__name__}, got {type(report[key]).__name__}")
    problems += [f"unknown key {k!r}" for k in report if k not in REPORT_KEYS and k not in OPTIONAL_REPORT_KEYS]
    for key, kind in OPTIONAL_REPORT_KEYS.items():
        if key in report and not isinstance(report[key], kind):
            problems.append(f"key {key!r} must be {kind.__name__}, got {type(report[key]).__name__}")
    if report.get("schema") not in (None, REPORT_SCHEMA_ID):
        problems.append(f"unsupported report schema {report.get('schema')!r}; expected {REPORT_SCHEMA_ID!r}")
    entries = report.get("reports") if isinstance(report.get("reports"), list) else []
    for i, entry in enumerate(entries):
        problems += _entry_problems(i, entry)
    rows = report.get("comparison") if isinstance(report.get("comparison"), list) else []
    if len(rows) != len(entries):
        problems.append(f"comparison has {len(rows)} rows for {len(entries)} reports")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or set(row) != set(COMPARISON_COLUMNS):
            problems.append(f"comparison[{i}] must have exactly the keys {list(COMPARISON_COLUMNS)}")
    return problems

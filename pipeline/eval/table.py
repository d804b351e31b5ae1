"""Plain-text rendering of evaluation report entries (schema ``geopipe.report/1``, see schemas/report.py).

One entry → a two-column metric / value table with every metric it holds; several entries →
one row per model with the paper's Tables 1–2 columns. Accuracies are shown in percent, NLL in
bits per ambient dimension tagged with its density space (S² and R³ values are not comparable).
"""

from __future__ import annotations

from geopipe.pipeline.eval.prdc import prdc_collapse_note

__all__ = ["format_table", "as_markdown"]

_SPACE_TAG = {"sphere": "S²", "r3": "R³"}
_RADII = (1, 25, 200, 750, 2500)
_NLL_NOTE = ("NLL in bits per ambient dimension, -mean log p / (3 ln 2); NLL and -H of S² densities (per steradian) "
             "and R³ densities (per unit volume) are not comparable.")


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _get(entry: dict, section: str, key: str):
    sec = entry.get(section)
    return None if not isinstance(sec, dict) else sec.get(key)


def _nll_cell(entry: dict) -> str:
    bits = _get(entry, "nll", "nll_bits_per_dim")
    return "-" if bits is None else f"{bits:.3f} {_SPACE_TAG.get(_get(entry, 'nll', 'space'), '?')}"


def _row(entry: dict) -> list[str]:
    g = lambda s, k: _get(entry, s, k)  # noqa: E731
    return [
        str(entry.get("name", "?")), str(entry.get("method") or "-"), str(entry.get("n", "-")),
        _fmt(g("distance", "geoscore"), ".1f"), _fmt(g("distance", "mean_km"), ".1f"), _fmt(g("distance", "median_km"), ".1f"),
        *(_fmt(g("distance", f"acc_{r}km"), ".1f", 100.0) for r in _RADII),
        _nll_cell(entry),
        *(_fmt(g("prdc", k), ".3f") for k in ("precision", "recall", "density", "coverage")),
        _fmt(g("calibration", "error"), ".3f"), _fmt(g("localizability", "mean_neg_entropy_nats"), ".3f"),
    ]


_HEADER = ["model", "method", "N", "GeoScore", "mean km", "median km", "acc@1", "acc@25", "acc@200", "acc@750",
           "acc@2500", "NLL bits/dim", "P", "R", "D", "C", "calib err", "mean -H nats"]


#: Administrative areas of the optional accuracy columns, in display order.
_ADMIN_AREAS = ("country", "region", "sub-region", "city")


def _grid(header: list[str], rows: list[list[str]], left: int) -> str:
    """Align columns: the first ``left`` columns left-justified, the rest right-justified."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    just = lambda i, s: s.ljust(widths[i]) if i < left else s.rjust(widths[i])  # noqa: E731
    lines = ["  ".join(just(i, s) for i, s in enumerate(r)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _single_rows(e: dict) -> list[list[str]]:
    space = _SPACE_TAG.get(_get(e, "nll", "space"), "?")
    rows = [["model", str(e.get("name"))], ["method", str(e.get("method") or "-")], ["space", str(e.get("space") or "-")],
            ["N", str(e.get("n"))]]
    if e.get("n_unlabelled"):
        rows += [["unlabelled (left out)", str(e["n_unlabelled"])]]
    if e.get("distance"):
        rows += [["N with truth", str(_get(e, "distance", "n"))], ["GeoScore", _fmt(_get(e, "distance", "geoscore"), ".1f")],
                 ["mean distance (km)", _fmt(_get(e, "distance", "mean_km"), ".1f")],
                 ["median distance (km)", _fmt(_get(e, "distance", "median_km"), ".1f")]]
        rows += [[f"acc@{r} km (%)", _fmt(_get(e, "distance", f"acc_{r}km"), ".1f", 100.0)] for r in _RADII]
    if e.get("nll"):
        rows += [[f"NLL (nats, {space})", _fmt(_get(e, "nll", "nll_nats"), ".4f")],
                 [f"NLL (bits/dim, {space})", _fmt(_get(e, "nll", "nll_bits_per_dim"), ".4f")]]
    if e.get("localizability"):
        loc = e["localizability"]
        rows += [["mean -H (nats)", _fmt(loc["mean_neg_entropy_nats"], ".4f")], ["median -H (nats)", _fmt(loc["median_neg_entropy_nats"], ".4f")],
                 ["mean entropy (bits)", _fmt(loc["mean_entropy_bits"], ".4f")],
                 ["median effective area (km²)", _fmt(loc["median_effective_area_km2"], ".4g")]]
    if e.get("calibration"):
        cal = e["calibration"]
        rows += [[f"HDR coverage @{p:g}", _fmt(c, ".3f")] for p, c in zip(cal["levels"], cal["coverage"] or [None] * len(cal["levels"]))]
        rows += [["calibration error", _fmt(cal["error"], ".4f")]]
    if e.get("prdc"):
        k = _get(e, "prdc", "k")
        rows += [[f"{name} (k={k})", _fmt(_get(e, "prdc", name), ".4f")] for name in ("precision", "recall", "density", "coverage")]
    for area, val in (e.get("admin") or {}).items():
        rows.append([f"{area} accuracy (%)", _fmt(val.get("accuracy"), ".2f", 100.0)])
    return rows


def format_table(reports: list[dict]) -> str:
    """Render report entries (dicts with the ``geopipe.report/1`` entry keys) as plain text.

    A single entry gives a two-column metric / value table; several give one row per entry with
    columns model, method, N, GeoScore, mean km, median km, acc@1/25/200/750/2500 (%), NLL
    bits/dim (tagged S² or R³), P, R, D, C, calib err, mean −H nats, then country/region/city
    accuracy (%) when any entry has admin accuracies. Missing values print as "-".
    """
    if not reports:
        return "(no reports)"
    if len(reports) == 1:
        text = _grid(["metric", "value"], _single_rows(reports[0]), left=1)
    else:
        areas = [a for a in _ADMIN_AREAS if any(a in (e.get("admin") or {}) for e in reports)]
        rows = [_row(e) + [_fmt(_get(e.get("admin") or {}, a, "accuracy"), ".1f", 100.0) for a in areas] for e in reports]
        text = _grid(_HEADER + [f"{a} %" for a in areas], rows, left=2)
    if any(e.get("nll") for e in reports):
        text += "\n" + _NLL_NOTE
    collapsed = prdc_collapse_note(reports)
    if collapsed:
        text += "\n" + collapsed
    for e in reports:
        text += _recall_line(e)
    return text


def _recall_line(e: dict) -> str:
    """Recall@K of a retrieval entry (answerable queries at the positive radius; all queries at 25 km)."""
    rec = e.get("retrieval")
    if not rec:
        return ""
    cells = " ".join(f"R@{k} {_fmt(v, '.1f', 100.0)}" for k, v in rec["recall"].items())
    km = " ".join(f"R@{k} {_fmt(v, '.1f', 100.0)}" for k, v in (rec["recall_km"].get("25") or {}).items())
    return (f"\n{e.get('name')}: Recall@K (%) at {rec['radius_m']:g} m: {cells} "
            f"({rec['n_unanswerable']} of {rec['n']} queries without a positive dropped"
            + (f"; {rec['n_unlabelled']} unlabelled queries left out" if rec.get("n_unlabelled") else "") + f"); at 25 km: {km}")


def _spans(rule: str) -> list[tuple[int, int]] | None:
    """Column spans of a ``----  ------`` rule line (None when the line is not one)."""
    import re

    if not rule.strip() or set(rule.strip()) - {"-", " "} or "--" not in rule:
        return None
    return [m.span() for m in re.finditer(r"-+", rule)]


def _fits(line: str, spans: list[tuple[int, int]]) -> bool:
    """A row of the table: blank between the columns and not longer than the rule."""
    gaps = [line[b:a] for (_, b), (a, _) in zip(spans, spans[1:])]
    return len(line.rstrip()) <= spans[-1][1] and all(not g.strip() for g in gaps)


def _cut(line: str, spans: list[tuple[int, int]]) -> list[str]:
    return [line[a:b].strip() for a, b in spans]


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def as_markdown(text: str) -> str:
    """The plain-text tables of :func:`format_table` and the failure table (a header line, a rule
    of dashes, aligned rows) as Markdown pipe tables; other lines become paragraphs. Cells are cut
    at the rule's dash runs, so aligned columns survive whatever their justification."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        spans = _spans(lines[i + 1]) if i + 1 < len(lines) else None
        if spans and len(spans) > 1:
            out += ["", _md_row(_cut(lines[i], spans)), "|" + "|".join("---" for _ in spans) + "|"]
            i += 2
            while i < len(lines) and lines[i].strip() and _fits(lines[i], spans):
                out.append(_md_row(_cut(lines[i], spans)))
                i += 1
            out.append("")
            continue
        out.append(lines[i])
        i += 1
    return "\n".join(out).strip() + "\n"


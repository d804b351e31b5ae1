"""The stored representation of embeddings: dtypes, normalisation, shard digests, fingerprints.

Pure functions shared by the writer (:mod:`geopipe.pipeline.store.writer`) and the checks of
:mod:`geopipe.pipeline.store.verify`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DTYPES", "ShardStat", "prepare_embeddings", "usable_embeddings", "shard_digest", "chain_fingerprint", "meta_encoding", "encode_meta",
           "encode_meta_block", "meta_as_json", "nonfinite_records", "labelled_rows", "unlabelled_rows", "count_labelled"]

#: Stored embedding dtypes.
DTYPES = ("float16", "float32")
_F16_MAX = float(np.finfo(np.float16).max)
_INT_EXACT = 2**53  # integers a float64 holds exactly


@dataclass(frozen=True)
class ShardStat:
    """Size in bytes, modification time (float seconds; None where the filesystem has none) and
    sha256 hex of the content (None when not computed)."""

    size: int
    mtime: float | None
    sha256: str | None = None


def prepare_embeddings(x: np.ndarray, dtype: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """(n, D) raw embeddings → ((n, D) stored values, (n,) bool ok mask).

    Normalisation is x / ||x||₂ per row in float32. Rows that are non-finite, zero (when
    normalising) or overflow ``dtype`` are not ok.
    """
    x = np.asarray(x, dtype=np.float32)
    ok, sumsq = _finite_rows(x)
    if normalize:
        norm = np.sqrt(sumsq).astype(np.float32)[:, None]
        ok &= norm[:, 0] > 0
        x = x / np.where(norm > 0, norm, np.float32(1.0))  # |values| <= 1 now: no float16 overflow
    elif dtype == "float16":
        ok &= ~(np.abs(np.where(ok[:, None], x, 0.0)) > _F16_MAX).any(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing rows are flagged above
        return x.astype(dtype), ok


def _finite_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((n,) bool all-finite rows, (n,) squared norms) of (n, D) float32 rows, in one pass; only
    rows whose float32 sum overflows (non-finite or huge values) are checked again in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        sumsq = np.einsum("ij,ij->i", x, x)
    ok = np.isfinite(sumsq)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        finite = np.isfinite(x[bad]).all(axis=1)
        ok[bad] = finite
        sumsq = sumsq.astype(np.float64)
        sumsq[bad] = np.where(finite, np.square(np.where(finite[:, None], x[bad], 0.0).astype(np.float64)).sum(axis=1), 0.0)
    return ok, sumsq


def usable_embeddings(x: np.ndarray, dtype: str, normalize: bool) -> np.ndarray:
    """(n,) bool: the rows :func:`prepare_embeddings` would mark ok, without preparing them."""
    x = np.asarray(x, dtype=np.float32)
    ok, sumsq = _finite_rows(x)
    if normalize:
        return ok & (sumsq > 0)
    if dtype == "float16":
        ok &= ~(np.abs(np.where(ok[:, None], x, 0.0)) > _F16_MAX).any(axis=1)
    return ok


def shard_digest(keys: Sequence[str], embeddings: np.ndarray, latlon: np.ndarray) -> str:
    """sha256 hex over a shard's rows as stored: "\\n"-joined keys, then the (n, D) embedding
    bytes (stored dtype) and the (n, 2) float64 latlon bytes (C order)."""
    data = "\n".join(keys).encode() + np.ascontiguousarray(embeddings).tobytes()
    return hashlib.sha256(data + np.ascontiguousarray(latlon, dtype=np.float64).tobytes()).hexdigest()


def meta_encoding(values: Sequence[str]) -> str:
    """How a new ``meta/<field>`` array stores its (n,) JSON texts ("" = absent), one of
    ``schemas.store.META_ENCODINGS``: "string" (the decoded strings) when every present value is a
    JSON string; "integer" when every one is a JSON integer, "number" when every one is a finite
    JSON number (float64, exact for integers up to 2**53; bools are not numbers); else "json"
    (the JSON texts themselves). A field without present values is "json"."""
    import json

    present = [v for v in values if v not in ("", "null")]
    if not present:
        return "json"
    if all(_plain_json_string(v) for v in present):
        return "string"
    try:
        decoded = [json.loads(v) for v in present]
    except ValueError:
        return "json"
    if all(isinstance(v, str) for v in decoded):
        return "string"
    if all(_number(v) is not None for v in decoded):
        return "integer" if all(isinstance(v, int) for v in decoded) else "number"
    return "json"


def _number(v) -> float | None:
    """The float64 that holds JSON value ``v`` exactly, or None (not a number, bool, non-finite, or
    an integer beyond 2**53)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int):
        return float(v) if abs(v) <= _INT_EXACT else None
    return v if math.isfinite(v) else None


def _plain_json_string(v: str) -> bool:
    """True for a JSON string literal with nothing to unescape ("abc"): its value is v[1:-1]."""
    return len(v) > 1 and v[0] == '"' and v[-1] == '"' and "\\" not in v and '"' not in v[1:-1] and v.isprintable()


def encode_meta(values: Sequence[str], encoding: str) -> np.ndarray:
    """(n,) JSON texts → the (n,) array stored in a meta array of ``encoding`` (see
    :func:`encode_meta_block`, whose texts of values a numeric array cannot hold this drops)."""
    return encode_meta_block(values, encoding)[0]


def encode_meta_block(values: Sequence[str], encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(n,) JSON texts → ((n,) stored values, (n,) texts for ``meta/<field>~json`` or None).

    "json": the texts as given. "string": the strings; null is absent (""), and a later
    non-string value keeps its JSON text (``3`` → ``"3"``: its type is lost, its text kept).
    "number"/"integer": float64, NaN for absent or null; a value that is not a number (a string,
    a bool, NaN, an integer beyond 2**53) is NaN here and its JSON text goes to the second array
    ("" on the other rows), which is None when every value fits.
    """
    import json

    if encoding in ("number", "integer"):
        out, texts = np.full(len(values), np.nan), None
        for i, v in enumerate(values):
            if v in ("", "null"):
                continue
            try:
                x = _number(json.loads(v))
            except ValueError:
                x = None
            if x is None:
                texts = np.full(len(values), "", dtype=object) if texts is None else texts
                texts[i] = v
            else:
                out[i] = x
        return out, texts
    if encoding != "string":
        return np.asarray(list(values), dtype=object), None
    out = []
    for v in values:
        if _plain_json_string(v):
            out.append(v[1:-1])
            continue
        decoded = json.loads(v) if v not in ("", "null") else ""
        out.append(decoded if isinstance(decoded, str) else v)
    return np.asarray(out, dtype=object), None


def meta_as_json(stored: np.ndarray, encoding: str, texts: np.ndarray | None = None) -> np.ndarray:
    """Stored meta values → JSON texts ("" = absent), the form :mod:`geopipe.pipeline.store.reader`
    returns. ``texts``: the rows of a numeric field's ``~json`` array (non-empty ones win)."""
    if encoding in ("number", "integer"):
        integer = encoding == "integer"
        out = np.asarray(["" if x != x else (str(int(x)) if integer and x.is_integer() else repr(x))
                          for x in np.asarray(stored, dtype=np.float64).tolist()], dtype=object)
        if texts is not None:
            texts = np.asarray(texts, dtype=object)
            out = np.where(texts != "", texts, out).astype(object)
        return out
    if encoding != "string":
        return stored
    import json

    return np.asarray([json.dumps(v, ensure_ascii=False) if v != "" else "" for v in stored.tolist()], dtype=object)


def labelled_rows(latlon: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows of (n, 2) degrees that carry a location (both coordinates finite)."""
    ll = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    return np.isfinite(ll).all(axis=1)


def unlabelled_rows(latlon: np.ndarray) -> np.ndarray:
    """(n,) bool: the rows of (n, 2) degrees of unlabelled records, (NaN, NaN) (schemas/store.py)."""
    ll = np.asarray(latlon, dtype=np.float64).reshape(-1, 2)
    return np.isnan(ll).all(axis=1)


def count_labelled(latlon, start: int, stop: int, block: int = 1 << 20) -> int:
    """Rows of ``latlon[start:stop]`` with a location, read ``block`` rows at a time (an array
    or a store view whose slices are (m, 2) arrays)."""
    return sum(int(labelled_rows(latlon[a:min(stop, a + block)]).sum()) for a in range(start, stop, block))


def nonfinite_records(keys: Sequence[str], embeddings: np.ndarray | None = None, latlon: np.ndarray | None = None) -> str:
    """"" when every row is usable; else one line naming the first bad record by key and what is
    non-finite ("record 'k': embedding has NaN (+3 more records)"). Rows: (n,) keys, (n, D)
    embeddings, (n, 2) degrees. An unlabelled record's (NaN, NaN) coordinates are usable; one
    NaN coordinate or an infinite one is not."""
    for name, values in (("embedding", embeddings), ("coordinates", latlon)):
        if values is None or not len(values):
            continue
        if name == "embedding":
            with np.errstate(invalid="ignore"):
                bad = ~np.isfinite(np.asarray(values, dtype=np.float32)).all(axis=1)
        else:
            bad = ~(labelled_rows(values) | unlabelled_rows(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            what = "NaN" if np.isnan(np.asarray(values[i], dtype=np.float64)).any() else "an infinite value"
            more = f" (+{int(bad.sum()) - 1} more records)" if bad.sum() > 1 else ""
            return f"record {str(keys[i])!r}: {name} has {what}{more}"
    return ""


def chain_fingerprint(fingerprint: str, digests: Sequence[str]) -> str:
    """The store fingerprint: sha256 chained over the shards' digests in record order (from "")."""
    for digest in digests:
        fingerprint = hashlib.sha256((fingerprint + digest).encode()).hexdigest()
    return fingerprint

"""Which records are queries, which are the database, and which rows a query must not
retrieve (itself, its own capture).

Modes for one store (two stores need none: every record of one is a query, of the other a
database row): ``column`` (a metadata field such as ``split``: rows equal to ``query_value``
are queries, the others the database), ``blocks`` (spatial cells of ``block_m`` metres,
hashed: a seeded fraction of the cells holds the queries, so no cell feeds both sides),
``capture`` (the same by capture id) and ``leave_one_out`` (every record queries all others).
Exclusion groups are capture ids when the store has them, else the row itself.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core.errors import ConfigError, GeopipeError

__all__ = ["SPLIT_MODES", "SplitConfig", "QueryDatabase", "decode_meta", "group_ids", "spatial_blocks", "split_rows"]

SPLIT_MODES = ("column", "blocks", "capture", "leave_one_out")


@dataclass(frozen=True)
class SplitConfig:
    """mode: one of :data:`SPLIT_MODES`; column/query_value for ``column``; block_m (metres) for
    ``blocks``; query_fraction and seed for ``blocks``/``capture``; capture_field names the
    metadata field with capture ids (absent field: each record is its own capture)."""

    mode: str = "column"
    column: str = "split"
    query_value: str = "test"
    block_m: float = 500.0
    query_fraction: float = 0.2
    seed: int = 0
    capture_field: str = "capture_id"

    def __post_init__(self):
        if self.mode not in SPLIT_MODES:
            raise ConfigError(f"unknown split mode {self.mode!r}; choose one of {list(SPLIT_MODES)}")
        if not (isinstance(self.block_m, (int, float)) and math.isfinite(self.block_m) and self.block_m > 0):
            raise ConfigError(f"split block_m (--block-m) must be a finite number of metres > 0, got {self.block_m!r}")
        if not (isinstance(self.query_fraction, (int, float)) and 0 < self.query_fraction < 1):
            raise ConfigError(f"split query_fraction (--query-fraction) must lie strictly between 0 and 1, got {self.query_fraction!r}")


@dataclass(frozen=True)
class QueryDatabase:
    """query_rows (Q,), db_rows (N,) int64 store rows ascending; query_groups (Q,) and
    db_groups (store rows,) int64 exclusion ids (equal id = never retrieved), or None."""

    query_rows: np.ndarray
    db_rows: np.ndarray
    query_groups: np.ndarray | None
    db_groups: np.ndarray | None


def decode_meta(values: np.ndarray) -> list:
    """Store metadata values (JSON strings, "" = absent) → Python values (None when absent)."""
    return [json.loads(v) if isinstance(v, str) and v else None for v in values]


def group_ids(values) -> np.ndarray:
    """(N,) int64 ids, equal for equal values (None values get ids of their own)."""
    vals = list(values)
    out = np.empty(len(vals), dtype=np.int64)
    seen: dict = {}
    for i, v in enumerate(vals):
        key = ("row", i) if v is None else ("v", json.dumps(v, sort_keys=True))
        out[i] = seen.setdefault(key, len(seen))
    return out


def _mix(x: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of int64 ids (a seeded hash, uniform in [0, 1))."""
    z = (x.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) & np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


def spatial_blocks(latlon: np.ndarray, block_m: float) -> np.ndarray:
    """(N,) int64 cell ids of an equal-area-ish grid of ``block_m`` metre cells (rows of
    latitude, columns of longitude scaled by cos φ of the row)."""
    ll = np.asarray(latlon, dtype=np.float64)
    deg = block_m / (math.pi * 6371008.8 / 180.0)  # block size in degrees of latitude
    row = np.floor((ll[:, 0] + 90.0) / deg).astype(np.int64)
    centre = np.clip(np.deg2rad(-90.0 + (row + 0.5) * deg), -math.pi / 2, math.pi / 2)
    col = np.floor((ll[:, 1] + 180.0) * np.maximum(np.cos(centre), 1e-6) / deg).astype(np.int64)
    return row * 2**31 + col


def split_rows(latlon: np.ndarray, meta: dict[str, np.ndarray], cfg: SplitConfig, source: str = "store") -> QueryDatabase:
    """Query and database rows of one store (``meta``: field → JSON strings as stored)."""
    n = latlon.shape[0]
    if cfg.mode not in SPLIT_MODES:
        raise GeopipeError(f"unknown split mode {cfg.mode!r}; choose one of {list(SPLIT_MODES)}")
    captures = decode_meta(meta[cfg.capture_field]) if cfg.capture_field in meta else [None] * n
    groups = group_ids(captures)
    rows = np.arange(n, dtype=np.int64)
    if cfg.mode == "column":
        if cfg.column not in meta:
            raise GeopipeError(f"{source}: no metadata field {cfg.column!r} to split on; fields are {sorted(meta)} (or use --split blocks)")
        is_q = np.array([str(v) == cfg.query_value for v in decode_meta(meta[cfg.column])], dtype=bool)
    elif cfg.mode == "blocks":
        is_q = _mix(spatial_blocks(latlon, cfg.block_m), cfg.seed) < cfg.query_fraction
    elif cfg.mode == "capture":
        if cfg.capture_field not in meta:
            raise GeopipeError(f"{source}: no metadata field {cfg.capture_field!r} with capture ids (or use --split blocks)")
        is_q = _mix(groups, cfg.seed) < cfg.query_fraction
    else:
        return QueryDatabase(query_rows=rows, db_rows=rows, query_groups=groups, db_groups=groups)
    q, db = rows[is_q], rows[~is_q]
    if q.size == 0 or db.size == 0:
        side = "query" if q.size == 0 else "database"
        raise GeopipeError(f"{source}: split {cfg.mode!r} leaves the {side} side empty ({q.size} queries, {db.size} database rows)")
    return QueryDatabase(query_rows=q, db_rows=db, query_groups=groups[q], db_groups=groups)

"""Rejected samples: a small value type and atomic Parquet I/O for :mod:`geopipe.schemas.rejects`.

Paths may be local or fsspec urls (:mod:`geopipe.pipeline.core.fsio`).
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.schemas.rejects import REJECT_REASONS, REJECTS_SCHEMA

__all__ = ["Reject", "RejectsReadError", "rejects_table", "write_rejects", "read_rejects", "count_reasons"]


class RejectsReadError(GeopipeError):
    """A rejects Parquet file that cannot be read; ``path`` names it, ``reason`` is what the reader said."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"rejects file {path} cannot be read ({reason}); check the store with `geopipe store verify`")
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class Reject:
    """One skipped sample: its ``__key__`` ("" if unknown), shard url, reason and a one-line detail."""

    key: str
    shard: str
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}; choose one of {list(REJECT_REASONS)}")


def rejects_table(rejects: Iterable[Reject]) -> pa.Table:
    """Rejects → Arrow table with exactly :data:`geopipe.schemas.rejects.REJECTS_SCHEMA`."""
    rows = list(rejects)
    cols = {name: [getattr(r, name) for r in rows] for name in REJECTS_SCHEMA.names}
    return pa.Table.from_pydict(cols, schema=REJECTS_SCHEMA)


def write_rejects(path: str, rejects: Iterable[Reject] | pa.Table) -> None:
    """Write a rejects table atomically (temporary file + rename): readers see old or new, never half."""
    table = rejects if isinstance(rejects, pa.Table) else rejects_table(rejects)
    buf = io.BytesIO()
    pq.write_table(table.cast(REJECTS_SCHEMA), buf)
    fsio.write_atomic(path, buf.getvalue())


def read_rejects(path: str) -> pa.Table:
    """Read a rejects Parquet file; a missing file reads as an empty table."""
    if not fsio.exists(path):
        return REJECTS_SCHEMA.empty_table()
    try:
        return pq.read_table(io.BytesIO(fsio.read_bytes(path)), schema=REJECTS_SCHEMA)
    except (pa.ArrowException, OSError) as exc:  # a damaged file: one line naming it, not a pyarrow traceback
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RejectsReadError(path, f"{type(exc).__name__}: {text}" if text else type(exc).__name__) from None


def count_reasons(rejects: Iterable[Reject] | pa.Table) -> dict[str, int]:
    """reason → count, in :data:`REJECT_REASONS` order, omitting zero counts."""
    if isinstance(rejects, pa.Table):
        counts = Counter(rejects.column("reason").to_pylist())
    else:
        counts = Counter(r.reason for r in rejects)
    return {reason: counts[reason] for reason in REJECT_REASONS if counts[reason]}

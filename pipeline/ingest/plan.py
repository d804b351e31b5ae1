"""Incremental, resumable runs over shards: what to do with each shard, and the reject budget.

A store's completion records (``attrs["shards"]``: url → record) say which shards are in it.
:func:`plan_shards` compares them with the shards a run is given:

* new shards (no record) are extracted, in the given order;
* recorded shards whose file is unchanged are skipped (resume / incremental append);
* recorded shards whose file changed are reported and handled by ``on_changed``:
  ``"error"`` (default) refuses, ``"skip"`` keeps the old rows, ``"reextract"`` truncates the
  store at the first changed shard and extracts it and every later shard again (a store's
  shards are contiguous row ranges, so rows cannot be replaced in the middle);
* recorded shards the run is no longer given are reported as missing (their rows stay).

A file "changed" when its size differs, or — by default — its mtime differs; with
``verify_hash`` the sha256 of its bytes is compared instead of the mtime (for records that
carry one), so a touched or re-downloaded identical copy counts as unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.ingest.shards import file_sha256, shard_stat
from geopipe.pipeline.store.format import ShardStat

__all__ = ["ON_CHANGED", "ShardChangedError", "TooManyRejectsError", "ShardPlan", "change_reason", "plan_shards",
           "RejectBudget"]

#: Policies for shards whose file changed since they were written into the store.
ON_CHANGED = ("error", "skip", "reextract")
#: Samples a run must have seen before the reject fraction can fail it early (before the end).
_EARLY_FAIL_MIN_SAMPLES = 1000


class ShardChangedError(GeopipeError):
    """A shard's file differs from when it was written into the store (and on_changed="error")."""


class TooManyRejectsError(GeopipeError):
    """The fraction of rejected samples exceeded ``max_reject_fraction``."""


@dataclass(frozen=True)
class ShardPlan:
    """todo: (url, stat) to write, in order; skipped: recorded urls left as they are;
    changed: recorded urls whose file changed; missing: recorded urls not given (record order);
    truncate_at: record index to truncate the store at before writing (re-extraction) or None."""

    todo: tuple[tuple[str, ShardStat], ...]
    skipped: tuple[str, ...]
    changed: tuple[str, ...]
    missing: tuple[str, ...]
    truncate_at: int | None = None


def change_reason(rec: Mapping, stat: ShardStat, url: str, verify_hash: bool,
                  hash_fn: Callable[[str], str] = file_sha256) -> str | None:
    """Why the file at ``url`` differs from its completion record ``rec`` (one phrase), or None."""
    if rec["size"] != stat.size:
        return f"size {rec['size']} → {stat.size} bytes"
    if verify_hash and rec.get("sha256"):
        digest = stat.sha256 or hash_fn(url)
        return None if digest == rec["sha256"] else "content sha256 differs"
    if rec["mtime"] != stat.mtime:
        return f"modified {_when(stat.mtime)}, extracted from the version of {_when(rec['mtime'])}"
    return None


def _when(mtime: float | None) -> str:
    """A file time for messages: ``2026-11-30 17:41:06 UTC`` (or "unknown")."""
    import datetime

    if mtime is None:
        return "unknown time"
    return datetime.datetime.fromtimestamp(mtime, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def plan_shards(urls: Sequence[str], records: Mapping[str, Mapping], *, store: str, on_changed: str = "error",
                verify_hash: bool = False, stat_fn: Callable[[str], ShardStat] = shard_stat,
                hash_fn: Callable[[str], str] = file_sha256) -> ShardPlan:
    """Plan a run over ``urls`` against a store's completion ``records`` (see the module docstring).

    Raises :class:`ShardChangedError` for changed shards under ``on_changed="error"``, and
    GeopipeError when re-extraction would drop shards that ``urls`` no longer include.
    """
    if on_changed not in ON_CHANGED:
        raise ConfigError(f"unknown on_changed policy {on_changed!r}; choose one of {list(ON_CHANGED)}")
    stats = {url: stat_fn(url) for url in urls}
    changed = {}
    for url in urls:
        if url in records:
            why = change_reason(records[url], stats[url], url, verify_hash, hash_fn)
            if why:
                changed[url] = why
    given = set(urls)
    missing = tuple(u for u, _ in sorted(records.items(), key=lambda kv: kv[1]["index"]) if u not in given)
    if changed and on_changed == "error":
        url, why = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ShardChangedError(f"shard {url} changed since it was written into {store} ({why}){more}; pass "
                                f"--on-changed skip to keep the old rows, --on-changed reextract to replace them "
                                f"(on_changed = \"skip\" / \"reextract\" in a pipeline config), or use a new store")
    redo, cut = set(), None
    if changed and on_changed == "reextract":
        cut = min(records[u]["index"] for u in changed)
        redo = {u for u, rec in records.items() if rec["index"] >= cut}
        lost = sorted(redo - given, key=lambda u: records[u]["index"])
        if lost:
            raise GeopipeError(f"re-extracting {next(iter(changed))} from {store} would drop the later shard {lost[0]}, "
                               f"which this run does not include; pass it too, or use --on-changed skip")
    todo = tuple((u, stats[u]) for u in urls if u not in records or u in redo)
    skipped = tuple(u for u in urls if u in records and u not in redo)
    return ShardPlan(todo, skipped, tuple(changed), missing, cut)


class RejectBudget:
    """Counts of one run and the reject-fraction policy (``max_reject_fraction`` in [0, 1])."""

    def __init__(self, max_reject_fraction: float, rejects_path: str):
        self.max_fraction, self.rejects_path = float(max_reject_fraction), rejects_path
        self.ok, self.reasons, self.shards = 0, Counter(), 0

    def add(self, n_ok: int, reasons: Sequence[str]) -> None:
        """Record one committed shard: rows kept and the reasons of its rejects."""
        self.ok += n_ok
        self.reasons.update(reasons)
        self.shards += 1

    @property
    def rejected(self) -> int:
        return sum(self.reasons.values())

    def check(self, final: bool, rows: int | None = None, store_rejects: Mapping[str, int] | None = None) -> None:
        """Raise TooManyRejectsError when rejected / seen > max_reject_fraction: early (this
        run, once enough samples were seen) or final (over the whole store: ``rows`` and
        ``store_rejects``, so that a retried or resumed run cannot hide earlier rejects)."""
        ok, reasons = (rows, Counter(store_rejects)) if rows is not None else (self.ok, self.reasons)
        rejected = sum(reasons.values())
        seen = ok + rejected
        if not seen or (not final and seen < _EARLY_FAIL_MIN_SAMPLES):
            return
        if rejected / seen > self.max_fraction:
            why = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
            raise TooManyRejectsError(
                f"too many rejects: {rejected} of {seen} samples ({rejected / seen:.0%}) exceed "
                f"max_reject_fraction={self.max_fraction} ({why}); see {self.rejects_path}"
            )

"""The skeleton every ingest shares (``geopipe extract`` and ``geopipe import``).

:func:`run_ingest` locks the store, opens (or creates) it, plans the run against the store's
completion records (:func:`geopipe.pipeline.ingest.plan.plan_shards`: skip done shards,
handle changed ones, report missing ones), hands the shards to write to the stage's own
writer loop, keeps the reject budget, and assembles an :class:`IngestResult` whose one-line
summary goes to stderr. What differs between ingests — where embeddings come from (a
backbone over decoded images, ``.npy`` entries in shards, ``.npy``/Parquet pairs) — is the
two callables ``prepare`` and ``write``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.ingest.plan import ON_CHANGED, RejectBudget, TooManyRejectsError, plan_shards
from geopipe.pipeline.ingest.shards import file_sha256, shard_stat
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import META_NAME, StoreError
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import DTYPES, StoreWriter
from geopipe.schemas.rejects import REJECT_REASONS
from geopipe.schemas.store import REJECTS_FILE

__all__ = ["IngestOptions", "IngestResult", "OnCommit", "check_ingest_options", "meta_names", "run_ingest"]

#: Called by a stage's writer loop after each committed shard: (url, rows kept, its rejects).
OnCommit = Callable[[str, int, Sequence[Reject]], None]


@dataclass(frozen=True)
class IngestResult:
    """Rows added (of them, unlabelled: without a location) and rejects (this run); shards/pairs
    ingested, skipped (already done), whose file changed since the store recorded it, and in the
    store but not given; wall time of the stage.

    Subclasses name their unit (``UNIT``: "shards", "pairs"), their verb and their throughput.
    """

    store: str
    n_ok: int
    n_rejected: int
    rejects_by_reason: dict = field(default_factory=dict)
    shards_done: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    shards_changed: tuple[str, ...] = ()
    shards_missing: tuple[str, ...] = ()
    n_unlabelled: int = 0

    VERB = "ingest"
    UNIT = "shards"

    def _changed_how(self) -> str:
        """How changed shards were handled, for the summary ('' = not said)."""
        return ""

    def _throughput(self) -> str:
        return ""

    def all_unlabelled(self) -> bool:
        """True when records were added and none has a location (e.g. coordinates under other names)."""
        return bool(self.n_ok) and self.n_unlabelled == self.n_ok

    def summary(self) -> str:
        """One line: counts, rejects by reason, changed/missing shards, throughput, wall time."""
        why = ", ".join(f"{r}: {c}" for r, c in self.rejects_by_reason.items())
        unlabelled = f" ({self.n_ok - self.n_unlabelled} labelled, {self.n_unlabelled} unlabelled)" if self.n_unlabelled else ""
        text = (f"{self.VERB} → {self.store}: {self.n_ok} ok{unlabelled}, {self.n_rejected} rejected" + (f" ({why})" if why else "")
                + f"; {self.shards_done} {self.UNIT} {self.VERB}ed, {self.shards_skipped} already done")
        changed, missing = self.shards_changed, self.shards_missing
        if changed:
            how = self._changed_how()
            text += f"; {len(changed)} changed (" + (f"{how}, " if how else "") + f"e.g. {changed[0]})"
        if missing:
            text += f"; {len(missing)} in the store but not given (rows kept, e.g. {missing[0]})"
        return text + f"; {self._throughput()}, {self.seconds:.1f} s"


def check_ingest_options(dtype: str, max_reject_fraction: float, on_changed: str) -> None:
    """Raise ConfigError for an unknown store dtype or ``on_changed`` policy, or a reject
    fraction outside [0, 1] (the checks every ingest config makes)."""
    if dtype not in DTYPES:
        raise ConfigError(f"unknown embedding dtype {dtype!r}; choose one of {list(DTYPES)}")
    if on_changed not in ON_CHANGED:
        raise ConfigError(f"unknown on_changed policy {on_changed!r}; choose one of {list(ON_CHANGED)}")
    if not 0.0 <= float(max_reject_fraction) <= 1.0:
        raise ConfigError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction!r}")


def meta_names(names, reserved: Sequence[str] = (), what: str = "meta field") -> tuple[str, ...] | None:
    """``names`` (None: every scalar field) as a tuple, after checking each is a valid store meta
    name (letters, digits, '_', '-', '.') and not one of ``reserved`` (e.g. the coordinate keys)."""
    if names is None:
        return None
    names = tuple(names)
    bad = [m for m in names if not META_NAME.match(m) or m in reserved]
    if bad:
        extra = ", not the coordinates" if reserved else ""
        raise ConfigError(f"invalid {what} names {bad}: use letters, digits, '_', '-', '.'{extra}")
    return names


@dataclass(frozen=True)
class IngestOptions:
    """Store-side options of every ingest (their defaults live in the stage configs). dtype,
    normalize: of a newly created store (an existing one must match); max_reject_fraction in
    [0, 1]; on_changed and verify_hash: see :mod:`geopipe.pipeline.ingest.plan`; progress: the
    summary line on stderr; created_by: provenance recorded in a new store's attributes."""

    dtype: str
    normalize: bool
    max_reject_fraction: float
    on_changed: str
    verify_hash: bool
    progress: bool
    created_by: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ingest_options(self.dtype, self.max_reject_fraction, self.on_changed)


def _open_writer(path: str, opts: IngestOptions, prepare: Callable[[], tuple[dict, int, Any]]) -> tuple[StoreWriter, Any]:
    """Lock the store first (a second run fails fast, before any model loads), then ``prepare``
    and open the writer; on failure release the lock and remove a store folder this call made."""
    existed = fsio.exists(path)
    lock = StoreWriter.lock(path)
    try:
        identity, embed_dim, ctx = prepare()
        writer = StoreWriter.open(path, backbone=identity, embed_dim=embed_dim, dtype=opts.dtype, normalize=opts.normalize,
                                  created_by=opts.created_by, lock=lock)
    except BaseException:
        lock.release()
        if not existed and fsio.is_local(path) and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
        raise
    return writer, ctx


def _nothing_to_do(path: str, urls, store: str, opts: IngestOptions, same_source: Callable[[dict], bool] | None,
                   stat_fn, hash_fn):
    """(plan, store attributes) when the existing store at ``path`` already holds every shard of
    ``urls`` unchanged and ``same_source(recorded backbone identity)`` says the run's source is the
    one recorded (with the same dtype and normalisation); None when there is work, doubt or no store.
    Lets a rerun with nothing new skip ``prepare`` (loading a backbone, starting a cluster)."""
    if same_source is None or not fsio.isfile(fsio.join(path, "zarr.json")):
        return None
    import zarr

    attrs = dict(zarr.open_group(path, mode="r").attrs)
    if (not isinstance(attrs.get("backbone"), dict) or not same_source(attrs["backbone"]) or attrs.get("dtype") != opts.dtype
            or attrs.get("normalized") != opts.normalize):
        return None  # the full path loads the source and says precisely what differs
    records = attrs.get("shards", {})
    try:
        given = _given(urls, records)
    except StoreError:  # rows a crashed run left uncommitted (sources read its keys): the full path repairs them first
        return None
    plan = plan_shards(given, records, store=store, on_changed=opts.on_changed, verify_hash=opts.verify_hash,
                       stat_fn=stat_fn, hash_fn=hash_fn)
    return (plan, attrs) if not plan.todo and plan.truncate_at is None else None


def _given(urls, records: dict) -> list[str]:
    """The run's urls: ``urls``, or ``urls(records)`` when they depend on what the store holds."""
    return list(urls(records) if callable(urls) else urls)


def run_ingest(
    urls: Sequence[str] | Callable[[dict], Sequence[str]],
    store: str,
    opts: IngestOptions,
    *,
    prepare: Callable[[], tuple[dict, int, Any]],
    write: Callable[[StoreWriter, tuple[tuple[str, ShardStat], ...], Any, OnCommit], None],
    finish: Callable[[dict, float], IngestResult],
    stat_fn: Callable[[str], ShardStat] = shard_stat,
    hash_fn: Callable[[str], str] = file_sha256,
    t0: float | None = None,
    same_source: Callable[[dict], bool] | None = None,
    on_done: Callable[[], None] | None = None,
) -> IngestResult:
    """Ingest ``urls`` (shards or pairs, in order) into the store at ``store`` (path or url).

    urls: the sources, or a callable of the store's completion records (url → record; {} for a
        new store) returning them — image folders keep the ranges a store recorded
        (:meth:`geopipe.pipeline.ingest.sources.Inputs.urls`).

    prepare() → (backbone identity dict, embedding width, ctx): runs with the store locked and
        before the writer opens (load a backbone, read the width of precomputed embeddings).
    write(writer, todo, ctx, on_commit): writes each planned (url, stat) of ``todo`` in order,
        calling ``on_commit(url, n_ok, rejects)`` after each; ``on_commit`` raises
        TooManyRejectsError once the reject fraction is exceeded (committed shards stay).
    finish(fields, per_s) → the stage's result: ``fields`` are the :class:`IngestResult`
        fields, ``per_s`` samples (kept + rejected) per second of ``write``.
    stat_fn, hash_fn: a url's (size, mtime) and content sha256, for planning.
    t0: the stage's start (``time.perf_counter()``) for ``seconds``; default: now.
    same_source(recorded backbone identity) → True when this run's source is that one, judged
        without loading it (names and tags); then a rerun with every shard already in the store
        skips ``prepare`` altogether (no backbone load, no cluster start). None: always prepare.
    on_done(): runs with the store still locked once every given shard is in (e.g. removing
        staged fragments a killed distributed run left).

    The summary line is printed (``opts.progress``) before the final reject check over the
    whole store, which raises TooManyRejectsError when a resumed store holds too many.
    """
    t0 = time.perf_counter() if t0 is None else t0
    path = fsio.normalize(store)
    budget = RejectBudget(opts.max_reject_fraction, fsio.join(path, REJECTS_FILE))
    if same_source is not None and fsio.isfile(fsio.join(path, "zarr.json")):
        lock = StoreWriter.lock(path)
        try:
            done = _nothing_to_do(path, urls, store, opts, same_source, stat_fn, hash_fn)
            if done is not None:
                if on_done is not None:
                    on_done()
                return _report(done[0], done[1], budget, store, opts, finish, t0)
        finally:
            lock.release()
    writer, ctx = _open_writer(path, opts, prepare)
    unlabelled = [0]  # rows committed without a location, this run
    committed: list[tuple[str, int, int]] = []  # this run's shards in order: (url, rows kept, rejects)

    def on_commit(url: str, n_ok: int, rejects: Sequence[Reject]) -> None:
        if n_ok == 0 and not rejects:
            print(f"geopipe: warning: {url} holds no samples (an empty tar or pair?); recorded as done with 0 rows",
                  file=sys.stderr)
        unlabelled[0] += n_ok - int(writer.shards[url].get("labelled", n_ok))
        budget.add(n_ok, [r.reason for r in rejects])
        committed.append((url, n_ok, len(rejects)))
        try:
            budget.check(final=False)
        except TooManyRejectsError as exc:  # the shard that crossed the limit is not kept: a rerun redoes it
            writer.truncate(writer.shards[url]["index"])
            raise TooManyRejectsError(f"{exc}; {url} was not kept (shards before it were): fix or drop the bad data, "
                                      f"or rerun with a higher --max-reject-fraction") from None

    with writer:
        plan = plan_shards(_given(urls, writer.shards), writer.shards, store=store, on_changed=opts.on_changed, verify_hash=opts.verify_hash,
                           stat_fn=stat_fn, hash_fn=hash_fn)
        if plan.truncate_at is not None:
            writer.truncate(plan.truncate_at)
        t_loop = time.perf_counter()
        if plan.todo:
            write(writer, plan.todo, ctx, on_commit)
            _drop_crossing_shard(writer, committed, budget)
        t_loop = time.perf_counter() - t_loop
        if on_done is not None:  # every planned shard is in (write raises otherwise)
            on_done()
    return _report(plan, writer.attrs, budget, store, opts, finish, t0, t_loop, unlabelled[0])


def _drop_crossing_shard(writer, committed: list[tuple[str, int, int]], budget: RejectBudget) -> None:
    """The whole-store reject check once this run's shards are in: when the store is over the
    limit, the first of this run's shards with which it crossed the limit is not kept (nor any
    after it), so the store never holds more rejects than allowed and a rerun redoes that shard;
    TooManyRejectsError says which. A store that was over the limit before this run is left to
    the final check of :func:`_report` (it says which limit would accept it)."""
    rows, rejects = int(writer.attrs["rows"]), writer.attrs["rejects"]
    try:
        budget.check(final=True, rows=rows, store_rejects=rejects)
        return
    except TooManyRejectsError as exc:
        error = exc
    ok, bad = rows - sum(c[1] for c in committed), sum(rejects.values()) - sum(c[2] for c in committed)
    over = lambda ok, bad: ok + bad > 0 and bad / (ok + bad) > budget.max_fraction  # noqa: E731
    if over(ok, bad):
        return
    for url, n_ok, n_bad in committed:
        ok, bad = ok + n_ok, bad + n_bad
        if over(ok, bad):
            writer.truncate(writer.shards[url]["index"])
            raise TooManyRejectsError(f"{error}; {url} was not kept (shards before it were): fix or drop the bad data, "
                                      f"or rerun with a higher --max-reject-fraction") from None


def _report(plan, attrs: dict, budget: RejectBudget, store: str, opts: IngestOptions, finish, t0: float,
            t_loop: float = 0.0, unlabelled: int = 0) -> IngestResult:
    """The run's result (summary on stderr), after the final reject check over the whole store."""
    seen = budget.ok + budget.rejected
    common = {
        "store": store, "n_ok": budget.ok, "n_rejected": budget.rejected, "n_unlabelled": unlabelled,
        "rejects_by_reason": {r: budget.reasons[r] for r in REJECT_REASONS if budget.reasons[r]},
        "shards_done": budget.shards, "shards_skipped": len(plan.skipped), "seconds": time.perf_counter() - t0,
        "shards_changed": plan.changed, "shards_missing": plan.missing,
    }
    result = finish(common, seen / t_loop if t_loop > 0 else 0.0)
    if opts.progress:
        print(result.summary(), file=sys.stderr)
    rows, rejects = int(attrs["rows"]), attrs["rejects"]
    try:
        budget.check(final=True, rows=rows, store_rejects=rejects)
    except TooManyRejectsError as exc:  # every shard is in: rerunning changes nothing, so say what does
        need = math.ceil(100 * sum(rejects.values()) / (rows + sum(rejects.values()))) / 100
        raise TooManyRejectsError(f"{exc}; the store holds every shard: accept it with --max-reject-fraction {need:.2f}, "
                                  f"or extract the good shards into a new store") from None
    return result

"""Store tools stage: ``geopipe store info``, ``geopipe store verify`` (:mod:`geopipe.pipeline.store.verify`) and
``geopipe store repair``.

Repair rebuilds what the store itself holds the makings of, and drops the damaged shards so that
the next extract (or import) of the same sources writes them again. Rebuilt without dropping
anything (a writer does it when it opens, :meth:`geopipe.pipeline.store.writer.StoreWriter.open`):
``rejects.parquet`` from the per-shard parts, the consolidated metadata of the root ``zarr.json``,
the ``rejects`` node of an older store; temporary files of killed writes are removed. Dropped: a
store's shards are contiguous row ranges, so dropping shard *k* drops every later shard too
(:meth:`~geopipe.pipeline.store.writer.StoreWriter.truncate`, one atomic commit). The damaged chunk
files and rejects parts are deleted first: they lie wholly in the dropped rows (the first dropped
shard is the one holding a damaged chunk's first row), and no decoder must meet them. A repair
interrupted between the deletions and the commit leaves chunks missing from committed rows, which
the next ``store verify`` / ``store repair`` finds again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.store.reader import EmbeddingStore, StoreError
from geopipe.pipeline.store.verify import StoreInfo, check_store, store_info
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["StoreInfoConfig", "StoreInfoResult", "run_store_info", "StoreVerifyConfig", "StoreVerifyResult", "run_store_verify",
           "StoreRepairConfig", "RepairResult", "run_store_repair"]


def _check_store(store) -> None:
    if not isinstance(store, str) or not store:
        raise ConfigError("a store path or url is required")


@dataclass(frozen=True)
class StoreInfoConfig:
    """store: path or fsspec url of an embedding store."""

    store: str

    def __post_init__(self) -> None:
        _check_store(self.store)


@dataclass(frozen=True)
class StoreInfoResult:
    """info: the summary; text: one ``name: value`` line per item."""

    info: StoreInfo
    text: str

    def to_json(self) -> str:
        """The summary as one JSON object (``geopipe store info --json``): the fields of
        :class:`~geopipe.pipeline.store.verify.StoreInfo` (size in bytes, rejects by reason) and
        ``unlabelled``."""
        import json
        from dataclasses import asdict

        return json.dumps({**asdict(self.info), "unlabelled": self.info.rows - self.info.labelled}, indent=2, default=str)


def run_store_info(cfg: StoreInfoConfig) -> StoreInfoResult:
    """Summarise a store; raises StoreError (a GeopipeError) when it is not one."""
    info = store_info(cfg.store)
    return StoreInfoResult(info, "\n".join(info.lines()))


@dataclass(frozen=True)
class StoreVerifyConfig:
    """store: path or fsspec url of an embedding store."""

    store: str

    def __post_init__(self) -> None:
        _check_store(self.store)


@dataclass(frozen=True)
class StoreVerifyResult:
    """problems: one line each (empty = the store is valid); seconds: time spent reading it."""

    store: str
    problems: tuple[str, ...]
    seconds: float
    notes: tuple[str, ...] = ()
    damaged_shards: tuple[int, ...] = ()
    rows: int = -1
    labelled: int = -1  # rows with a location (-1: not known)
    rebuild: tuple[str, ...] = ()  # the problems `store repair` rebuilds without dropping anything

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        notes = [f"  note: {n}" for n in self.notes]
        if self.ok:
            counts = f", {self.rows} rows ({self.labelled} labelled, {self.rows - self.labelled} unlabelled)" if self.labelled >= 0 else ""
            return "\n".join([f"{self.store}: OK{counts} ({self.seconds:.1f} s)"] + notes)
        if self.damaged_shards:
            hint = [f"  repair: `geopipe store repair {self.store}` drops shard {min(self.damaged_shards)} and every later one; "
                    f"then run the same extract/import again to write them anew"]
        elif self.rebuild and len(self.rebuild) == len(self.problems):
            hint = [f"  repair: `geopipe store repair {self.store}` rebuilds {_rebuilt_things(self.rebuild)} from what the "
                    f"store holds; nothing is dropped"]
        else:
            hint = []
        return "\n".join([f"{self.store}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems] + notes + hint)


def _rebuilt_things(problems: tuple[str, ...]) -> str:
    things = [name for name, word in (("rejects.parquet", "rejects.parquet"), ("the consolidated metadata", "consolidated metadata"))
              if any(word in p for p in problems)]
    return " and ".join(things) or "them"


def run_store_verify(cfg: StoreVerifyConfig) -> StoreVerifyResult:
    """Check a store end to end (never raises for a broken store: problems are the result)."""
    t0 = time.perf_counter()
    check = check_store(cfg.store)
    return StoreVerifyResult(cfg.store, check.problems, time.perf_counter() - t0, check.notes, check.damaged_shards, check.rows,
                             check.labelled, check.rebuild)


@dataclass(frozen=True)
class StoreRepairConfig:
    """store: path of an embedding store to repair (``geopipe store repair``)."""

    store: str

    def __post_init__(self) -> None:
        _check_store(self.store)


@dataclass(frozen=True)
class RepairResult:
    """dropped: urls of the shards whose completion records were dropped (the next extract
    redoes them), in record order; rows: committed rows left; problems: what verification found;
    rebuilt: what was rebuilt or cleaned without dropping anything ("rejects.parquet rebuilt",
    "consolidated metadata written", "temporary files removed (3)", ...)."""

    store: str
    dropped: tuple[str, ...]
    rows: int
    problems: tuple[str, ...]
    rebuilt: tuple[str, ...] = ()


def run_store_repair(cfg: StoreRepairConfig) -> RepairResult:
    """Verify the store, rebuild what can be rebuilt and drop the shards from the first damaged one
    on (see the module docstring). Raises StoreError when the store is not repairable this way (not
    a store, broken records, or damage outside the record rows); returns with nothing dropped or
    rebuilt when all is well."""
    path = cfg.store
    check = check_store(path)
    unexplained = [p for p in check.problems if p not in check.rebuild]
    if unexplained and not check.damaged_shards:
        raise StoreError(f"{path}: {len(unexplained)} problem(s) that rebuilding or dropping shards does not repair (first: "
                         f"{unexplained[0]}); extract into a new store")
    if check.fixed_damage:
        raise StoreError(f"{path}: an array without a record axis is damaged; extract into a new store")
    for url in check.damaged_files:  # before any reader decodes them
        fsio.remove(url)
    attrs = EmbeddingStore(path).attrs
    with StoreWriter.open(path, backbone=attrs["backbone"], embed_dim=attrs["embed_dim"], dtype=attrs["dtype"],
                          normalize=attrs["normalized"]) as writer:
        dropped = writer.truncate(min(check.damaged_shards)) if check.damaged_shards else []
        rows = writer.rows
        rebuilt = tuple(what if n == 1 else f"{what} ({n})" for what, n in writer.housekeeping.items())
    return RepairResult(path, tuple(dropped), rows, check.problems, rebuilt)

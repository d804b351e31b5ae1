"""Store tools stage: ``geopipe store info``, ``geopipe store verify`` (:mod:`geopipe.pipeline.store.verify`) and
``geopipe store repair`` (:mod:`geopipe.pipeline.store.repair`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.store.repair import RepairResult, repair_store
from geopipe.pipeline.store.verify import StoreInfo, check_store, store_info

__all__ = ["StoreInfoConfig", "StoreInfoResult", "run_store_info", "StoreVerifyConfig", "StoreVerifyResult", "run_store_verify",
           "StoreRepairConfig", "run_store_repair"]


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

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        notes = [f"  note: {n}" for n in self.notes]
        if self.ok:
            counts = f", {self.rows} rows ({self.labelled} labelled, {self.rows - self.labelled} unlabelled)" if self.labelled >= 0 else ""
            return "\n".join([f"{self.store}: OK{counts} ({self.seconds:.1f} s)"] + notes)
        hint = [f"  repair: `geopipe store repair {self.store}` drops shard {min(self.damaged_shards)} and every later one; "
                f"then run the same extract/import again to write them anew"] if self.damaged_shards else []
        return "\n".join([f"{self.store}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems] + notes + hint)


def run_store_verify(cfg: StoreVerifyConfig) -> StoreVerifyResult:
    """Check a store end to end (never raises for a broken store: problems are the result)."""
    t0 = time.perf_counter()
    check = check_store(cfg.store)
    return StoreVerifyResult(cfg.store, check.problems, time.perf_counter() - t0, check.notes, check.damaged_shards, check.rows,
                             check.labelled)


@dataclass(frozen=True)
class StoreRepairConfig:
    """store: path of an embedding store to repair (``geopipe store repair``)."""

    store: str

    def __post_init__(self) -> None:
        _check_store(self.store)


def run_store_repair(cfg: StoreRepairConfig) -> RepairResult:
    """Drop the damaged shards of a store so that the next extract/import writes them again
    (:mod:`geopipe.pipeline.store.repair`); raises StoreError when that cannot repair it."""
    return repair_store(cfg.store)

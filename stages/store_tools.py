"""Store tools stage: ``geopipe store info`` and ``geopipe store verify`` (:mod:`geopipe.pipeline.store.verify`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from geopipe.pipeline.store.verify import StoreInfo, store_info, verify_store
from geopipe.pipeline.core.errors import ConfigError

__all__ = ["StoreInfoConfig", "StoreInfoResult", "run_store_info", "StoreVerifyConfig", "StoreVerifyResult", "run_store_verify"]


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

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def text(self) -> str:
        if self.ok:
            return f"{self.store}: OK ({self.seconds:.1f} s)"
        return "\n".join([f"{self.store}: {len(self.problems)} problem(s)"] + [f"  - {p}" for p in self.problems])


def run_store_verify(cfg: StoreVerifyConfig) -> StoreVerifyResult:
    """Check a store end to end (never raises for a broken store: problems are the result)."""
    t0 = time.perf_counter()
    problems = verify_store(cfg.store)
    return StoreVerifyResult(cfg.store, tuple(problems), time.perf_counter() - t0)

"""Repairing a damaged store (``geopipe store repair``): drop the damaged shards so that the next
extract (or import) of the same sources writes them again.

A store's shards are contiguous row ranges, so dropping shard *k* drops every later shard too
(:meth:`geopipe.pipeline.store.writer.StoreWriter.truncate`, one atomic commit). The damaged
chunk files and rejects parts are deleted first: they lie wholly in the dropped rows (the first
dropped shard is the one holding a damaged chunk's first row), and no decoder must meet them.
A repair interrupted between the deletions and the commit leaves chunks missing from committed
rows, which the next ``store verify`` / ``store repair`` finds again.
"""

from __future__ import annotations

from dataclasses import dataclass

from geopipe.pipeline.core import fsio
from geopipe.pipeline.store.reader import EmbeddingStore, StoreError
from geopipe.pipeline.store.verify import check_store
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["RepairResult", "repair_store"]


@dataclass(frozen=True)
class RepairResult:
    """dropped: urls of the shards whose completion records were dropped (the next extract
    redoes them), in record order; rows: committed rows left; problems: what verification found."""

    store: str
    dropped: tuple[str, ...]
    rows: int
    problems: tuple[str, ...]


def repair_store(path: str) -> RepairResult:
    """Verify ``path`` and drop the shards from the first damaged one on. Raises StoreError when
    the store is not repairable this way (not a store, broken records, or damage outside the
    record rows); returns with nothing dropped when no chunk or rejects part is damaged."""
    check = check_store(path)
    if check.problems and not check.damaged_shards:
        raise StoreError(f"{path}: {len(check.problems)} problem(s) that dropping shards does not repair (first: "
                         f"{check.problems[0]}); extract into a new store")
    if check.fixed_damage:
        raise StoreError(f"{path}: an array without a record axis is damaged; extract into a new store")
    if not check.damaged_shards:
        return RepairResult(path, (), EmbeddingStore(path).rows, ())
    for url in check.damaged_files:  # before any reader decodes them
        fsio.remove(url)
    attrs = EmbeddingStore(path).attrs
    with StoreWriter.open(path, backbone=attrs["backbone"], embed_dim=attrs["embed_dim"], dtype=attrs["dtype"],
                          normalize=attrs["normalized"]) as writer:
        dropped = writer.truncate(min(check.damaged_shards))
        rows = writer.rows
    return RepairResult(path, tuple(dropped), rows, check.problems)

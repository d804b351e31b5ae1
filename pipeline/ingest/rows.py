"""One shard's decoded rows → the rows a store keeps, plus rejects, appended in one commit.

Shared by extraction (rows from images or embedded ``.npy`` entries) and import (rows from
embedding/metadata file pairs): rows whose embedding is unusable become ``invalid_embedding``
rejects, repeated keys ``duplicate_key`` rejects (the first occurrence in the store or the
shard is kept), and every reject is ordered by its sample index within the shard.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geopipe.pipeline.store.format import ShardStat, usable_embeddings
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["ShardRows", "commit_rows"]


@dataclass
class ShardRows:
    """Candidate rows of one shard, in shard order.

    idx: (n,) sample index of each row within the shard; keys: (n,) str; latlon: (n, 2)
    degrees; meta: (n,) dicts field → JSON string; embeddings: (n, D) float raw embeddings (an
    array, or a row source with ``[a:b]`` slices and ``select(rows)``, read a few chunks at a time);
    rejects: [(sample index, Reject)] found while decoding.
    """

    idx: list[int]
    keys: list[str]
    latlon: list
    meta: list[dict]
    embeddings: np.ndarray  # or a row source read in slices (ingest.pairs.NpyRows)
    rejects: list[tuple[int, Reject]] = field(default_factory=list)


def commit_rows(writer: StoreWriter, url: str, stat: ShardStat, rows: ShardRows) -> tuple[int, list[Reject]]:
    """Filter ``rows`` (unusable embeddings, duplicate keys) and append them as shard ``url``.

    Returns (rows kept, this shard's rejects in sample order).
    """
    attrs, per, n = writer.attrs, writer.block_rows, len(rows.keys)
    usable = np.concatenate([usable_embeddings(np.asarray(rows.embeddings[a:a + per]), attrs["dtype"], attrs["normalized"])
                             for a in range(0, n, per)] or [np.zeros(0, bool)])
    rejects, keep, seen = list(rows.rejects), [], set()
    for row, key in enumerate(rows.keys):
        if not usable[row]:
            detail = f"embedding is non-finite, zero or overflows {attrs['dtype']}"
            rejects.append((rows.idx[row], Reject(key, url, "invalid_embedding", detail)))
        elif key in writer.keys_seen or key in seen:
            where = "in the store" if key in writer.keys_seen else "earlier in this shard"
            rejects.append((rows.idx[row], Reject(key, url, "duplicate_key", f"key already {where}; first occurrence kept")))
        else:
            seen.add(key)
            keep.append(row)
    ordered = [r for _, r in sorted(rejects, key=lambda t: t[0])]
    fields = list(dict.fromkeys(name for row in keep for name in rows.meta[row]))
    columns = {name: [rows.meta[row].get(name, "") for row in keep] for name in fields}
    coords = np.asarray([rows.latlon[r] for r in keep], dtype=np.float64).reshape(-1, 2)
    if len(keep) == len(rows.embeddings):  # every row kept: no gather copy
        emb = rows.embeddings
    elif not keep:
        emb = np.zeros((0, attrs["embed_dim"]), np.float32)
    else:
        emb = rows.embeddings.select(keep) if hasattr(rows.embeddings, "select") else np.asarray(rows.embeddings)[keep]
    writer.append_shard(url, emb, coords, [rows.keys[r] for r in keep], columns, ordered, stat)
    return len(keep), ordered

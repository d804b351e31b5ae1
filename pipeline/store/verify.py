"""Inspecting and verifying embedding stores (``geopipe store info`` / ``geopipe store verify``).

:func:`verify_store` re-reads every committed row, one shard at a time, and checks what the
writer promises (:mod:`geopipe.schemas.store`): arrays at least ``rows`` long and of the recorded
shape and dtype; completion records contiguous over [0, rows) with the ``shard`` array equal
to their index; finite embeddings, of unit norm when normalised (|‖e‖ − 1| ≤ 2e-3 for
float16, 1e-4 for float32); latitudes in [−90, 90] and longitudes in [−180, 180) degrees, or
(NaN, NaN) for an unlabelled record (one NaN or an infinity is damage); the ``labelled`` counts
of the records and the store against the rows with a location; non-empty unique keys (and
``meta/keys`` equal to them); each shard's digest and the chained store fingerprint; rejects parts
matching the records' counts and ``attrs["rejects"]``, ``rejects.parquet`` consolidated from them,
and the consolidated metadata of the root ``zarr.json`` describing the arrays. The last two are
rebuilt by ``geopipe store repair`` (:attr:`StoreCheck.rebuild`) without dropping anything.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.store.chunks import MISSING_CHUNK, bytes_digest, check_chunks, chunk_refs, decode_chunks_safely
from geopipe.pipeline.store.format import chain_fingerprint, labelled_rows, shard_digest, unlabelled_rows
from geopipe.pipeline.store.hierarchy import consolidated_status, stale_temporaries
from geopipe.pipeline.store.layout import has_keys_coordinate
from geopipe.pipeline.store.reader import EmbeddingStore, StoreError, rejects_part_path
from geopipe.pipeline.store.rejects import RejectsReadError, count_reasons, read_rejects
from geopipe.schemas.store import LABELLED_ATTR, LEGACY_REJECTS_FILE, META_GROUP, META_KEYS, REJECTS_FILE

__all__ = ["NORM_TOLERANCE", "StoreInfo", "store_info", "StoreCheck", "check_store", "verify_store"]

#: Allowed |‖e‖₂ − 1| of stored normalised embeddings, by dtype (float16 rounding ≈ 2⁻¹¹ per entry).
NORM_TOLERANCE = {"float16": 2e-3, "float32": 1e-4}
_SHOWN = 5  # examples listed per problem


@dataclass(frozen=True)
class StoreInfo:
    """Summary of a store: counts (rows, those with a location), embedding format, backbone, shards,
    rejects, size on disk (bytes)."""

    path: str
    schema: str
    rows: int
    labelled: int
    embed_dim: int
    dtype: str
    normalized: bool
    backbone: dict
    shards: int
    rejects: dict
    meta_fields: list
    size_bytes: int
    fingerprint: str
    created_by: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Human-readable ``name: value`` lines."""
        bb = self.backbone
        n_rej = sum(self.rejects.values())
        why = ", ".join(f"{r}: {c}" for r, c in self.rejects.items())
        return [
            f"store: {self.path}",
            f"schema: {self.schema}",
            f"rows: {self.rows} ({self.labelled} labelled, {self.rows - self.labelled} unlabelled)",
            f"embeddings: ({self.rows}, {self.embed_dim}) {self.dtype}, {'L2-normalised' if self.normalized else 'raw'}",
            f"backbone: {bb.get('name')} (pretrained={bb.get('pretrained')}, fingerprint {str(bb.get('fingerprint'))[:12]})",
            f"shards done: {self.shards}",
            f"rejects: {n_rej}" + (f" ({why})" if why else ""),
            f"meta fields: {', '.join(self.meta_fields) or '-'}",
            f"size on disk: {self.size_bytes / 2**20:.2f} MiB ({self.size_bytes} bytes)",
            f"fingerprint: {self.fingerprint}",
            f"created by: geopipe {self.created_by.get('version')} (git {str(self.created_by.get('git_rev'))[:12]})",
        ]


def store_info(path: str) -> StoreInfo:
    """Read a store's summary (attributes and size on disk); raises StoreError for a non-store."""
    s = EmbeddingStore(path)
    a = s.attrs
    return StoreInfo(path=s.path, schema=a["schema"], rows=s.rows, labelled=s.labelled, embed_dim=a["embed_dim"], dtype=a["dtype"],
                     normalized=a["normalized"], backbone=a["backbone"], shards=len(a["shards"]), rejects=dict(a["rejects"]),
                     meta_fields=list(a["meta_fields"]), size_bytes=fsio.disk_usage(s.path),
                     fingerprint=a.get("fingerprint", ""), created_by=a.get("created_by", {}))


def _examples(items) -> str:
    items = [int(i) if isinstance(i, np.integer) else i for i in items]
    return ", ".join(map(repr, items[:_SHOWN])) + (f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else "")


def _check_rows(s: EmbeddingStore, start: int, stop: int, where: str) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Row-level checks of rows [start, stop) → (problems, embeddings, latlon, keys)."""
    problems = []
    emb, ll, keys = s.embeddings[start:stop], s.latlon[start:stop], s.keys[start:stop]
    values = emb.astype(np.float32)
    finite = np.isfinite(values).all(axis=1)
    if not finite.all():
        problems.append(f"{where}: {int((~finite).sum())} non-finite embeddings (rows {_examples(np.flatnonzero(~finite) + start)})")
    if s.attrs["normalized"]:
        with np.errstate(over="ignore", invalid="ignore"):  # damaged rows may hold huge values
            norms = np.linalg.norm(np.where(finite[:, None], values, 0.0), axis=1)
        off = finite & (np.abs(norms - 1.0) > NORM_TOLERANCE[s.attrs["dtype"]])
        if off.any():
            problems.append(f"{where}: {int(off.sum())} embeddings are not unit-norm (rows {_examples(np.flatnonzero(off) + start)})")
    lat, lon = ll[:, 0], ll[:, 1]
    with np.errstate(invalid="ignore"):
        out = ~(labelled_rows(ll) & (np.abs(lat) <= 90) & (lon >= -180) & (lon < 180)) & ~unlabelled_rows(ll)
    if out.any():
        hint = "; an unlabelled record has NaN in both" if not np.isfinite(ll[out]).all() else ""
        problems.append(f"{where}: {int(out.sum())} coordinates outside lat [-90, 90], lon [-180, 180) "
                        f"(rows {_examples(np.flatnonzero(out) + start)}){hint}")
    empty = [i + start for i, k in enumerate(keys) if not isinstance(k, str) or not k]
    if empty:
        problems.append(f"{where}: empty keys (rows {_examples(empty)})")
    return problems, emb, ll, keys


def _check_shards(s: EmbeddingStore, unreadable: frozenset = frozenset()) -> list[str]:
    """Per-record checks (rows, shard index, digest, meta keys) plus keys unique and the fingerprint
    chain; shards whose record index is in ``unreadable`` (a chunk of theirs cannot be decoded) are skipped."""
    problems, seen, dups, digests, labelled = [], set(), [], [], 0
    meta_keys = s._array(f"{META_GROUP}/{META_KEYS}") if has_keys_coordinate(s._group, s.attrs) else None
    records = sorted(s.attrs["shards"].items(), key=lambda kv: kv[1]["index"])
    for url, rec in records:
        start, stop, where = rec["start"], rec["stop"], f"shard {rec['index']} ({url})"
        if rec["n_ok"] != stop - start:
            problems.append(f"{where}: record says {rec['n_ok']} rows but spans [{start}, {stop})")
        digests.append(rec.get("digest", ""))
        if rec["index"] in unreadable:
            labelled = None
            continue
        found, emb, ll, keys = _check_rows(s, start, stop, where)
        problems += found
        n_lab = int(labelled_rows(ll).sum())
        labelled = None if labelled is None else labelled + n_lab
        if "labelled" in rec and rec["labelled"] != n_lab:
            problems.append(f"{where}: record says {rec['labelled']} labelled rows, {n_lab} rows have a location")
        if (s.shard[start:stop] != rec["index"]).any():
            problems.append(f"{where}: the shard array is not {rec['index']} on rows [{start}, {stop})")
        if rec.get("digest") and shard_digest(keys.tolist(), emb, ll) != rec["digest"]:
            problems.append(f"{where}: rows differ from the digest recorded when it was written")
        if meta_keys is not None and (meta_keys[start:stop] != keys).any():
            problems.append(f"{where}: meta/keys differs from keys on rows [{start}, {stop})")
        for k in keys.tolist():
            (dups.append(k) if k in seen else seen.add(k))
    if dups:
        problems.append(f"{len(dups)} repeated keys: {_examples(dups)}")
    if all(digests) and chain_fingerprint("", digests) != s.attrs.get("fingerprint"):
        problems.append("attrs fingerprint does not match the chain of shard digests")
    if LABELLED_ATTR in s.attrs and labelled is not None and s.attrs[LABELLED_ATTR] != labelled:
        problems.append(f"attrs {LABELLED_ATTR} says {s.attrs[LABELLED_ATTR]} rows have a location, {labelled} do")
    return problems


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error's text, at most ``limit`` characters, cut between words ("…")."""
    text = exc.reason if isinstance(exc, RejectsReadError) else str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0]
    return (cut if len(cut) > limit // 2 else line[:limit]) + " …"


def _part_damage(part: str, rec: dict) -> str:
    """What is wrong with a shard's rejects part on disk ("" = nothing): its digest, or unreadable."""
    want = rec.get("rejects_digest")
    if want and fsio.exists(part) and bytes_digest(fsio.read_bytes(part)) != want:
        return "its bytes differ from the digest recorded when it was committed"
    try:
        read_rejects(part)
    except Exception as exc:  # pyarrow raises several types for damaged Parquet
        return f"cannot be read ({_reason(exc)})"
    return ""


def _reason(exc: BaseException) -> str:
    return _first_line(exc) if isinstance(exc, RejectsReadError) else f"{type(exc).__name__}: {_first_line(exc)}"


def _check_rejects(s: EmbeddingStore, damaged_parts: list | None = None) -> list[str]:
    """Rejects parts against their records and ``attrs["rejects"]``; record indices of damaged
    parts are appended to ``damaged_parts``."""
    import pyarrow as pa

    damaged_parts = [] if damaged_parts is None else damaged_parts
    problems, parts, total = [], [], Counter()
    for url, rec in sorted(s.attrs["shards"].items(), key=lambda kv: kv[1]["index"]):
        part = rejects_part_path(s.path, rec["index"])
        damage = _part_damage(part, rec)
        if damage:
            problems.append(f"rejects part {part}, shard {rec['index']} ({url}): {damage}")
            damaged_parts.append(rec["index"])
            continue
        table = read_rejects(part)
        if rec["n_rejected"] and not fsio.exists(part):
            problems.append(f"shard {rec['index']} ({url}): rejects part {part} is missing ({rec['n_rejected']} rejects recorded)")
        elif table.num_rows != rec["n_rejected"]:
            problems.append(f"shard {rec['index']} ({url}): rejects part has {table.num_rows} rows, record says {rec['n_rejected']}")
        total.update(count_reasons(table))
        parts.append(table)
    if not damaged_parts and dict(total) != dict(s.attrs["rejects"]):
        problems.append(f"attrs rejects {s.attrs['rejects']} differ from the rejects parts {dict(total)}")
    whole = pa.concat_tables(parts) if parts and not damaged_parts else None
    legacy = not fsio.exists(fsio.join(s.path, REJECTS_FILE)) and fsio.exists(fsio.join(s.path, LEGACY_REJECTS_FILE))
    name = LEGACY_REJECTS_FILE if legacy else REJECTS_FILE  # stores from before the rejects folder kept it at the root
    try:
        consolidated = read_rejects(fsio.join(s.path, name))
    except Exception as exc:  # pyarrow raises several types for damaged Parquet
        problems.append(f"{name} cannot be read ({_reason(exc)}); {_REBUILD}")
        return problems
    if whole is not None and not consolidated.equals(whole):
        missing = "is missing" if not fsio.exists(fsio.join(s.path, name)) else "is stale"
        problems.append(f"{name} {missing} ({consolidated.num_rows} rows, parts hold {whole.num_rows}); {_REBUILD}")
    return problems


#: What verify says of a consolidated rejects file that does not match its parts.
_REBUILD = "`geopipe store repair` rebuilds it from the parts"


@dataclass(frozen=True)
class StoreCheck:
    """What :func:`check_store` found.

    problems: one line each (empty = valid); notes: lines that are not problems (arrays that
    older stores do not cover with chunk digests, no consolidated metadata, temporary files of
    killed writes); rebuild: the problems a writer rebuilds from what the store holds
    (``rejects.parquet``, consolidated metadata: ``geopipe store repair``, nothing dropped);
    rows, labelled: the store's committed rows and
    those with a location (-1 when it cannot be opened); damaged_shards: record indices of shards
    whose chunks or rejects part are damaged (re-extracting them repairs the store);
    damaged_files: those chunk files and parts; fixed_damage: damage that re-extraction cannot
    repair (a chunk of an array without a record axis).
    """

    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()
    damaged_shards: tuple[int, ...] = ()
    damaged_files: tuple[str, ...] = ()
    fixed_damage: bool = False
    rows: int = -1
    labelled: int = -1
    rebuild: tuple[str, ...] = ()


def _shards_of(records: list[dict], start: int, stop: int) -> list[int]:
    return [r["index"] for r in records if r["start"] < max(stop, start + 1) and r["stop"] > start]


def _check_chunk_bytes(s: EmbeddingStore, records: list[dict]) -> tuple[list[str], list[str], set[int], set[int], list[str], bool]:
    """Chunk digests first (nothing decoded); chunks that fail them, and every chunk of arrays
    without digests, are decoded in a child process (a decoder crash is reported, not suffered).
    Returns (problems, notes, damaged shard indices, shards with undecodable rows, damaged
    files, damage outside the record axis)."""
    damaged, uncovered = check_chunks(s.path, s._group, s.attrs)
    suspects = damaged + [(ref, "") for name in uncovered for ref in chunk_refs(s._group[name], name, s.rows)]
    to_decode = [ref for ref, why in suspects if why != MISSING_CHUNK]
    decoded = decode_chunks_safely(s.path, to_decode) if to_decode else {}
    problems, shards_hit, unreadable, files, fixed = [], set(), set(), [], False
    for ref, why in suspects:
        failure = decoded.get(ref, "")
        if not why and not failure:
            continue
        shards = _shards_of(records, ref.start, ref.stop) if ref.stop > ref.start else []
        where = f"rows [{ref.start}, {ref.stop}), shard {', '.join(map(str, shards))}" if shards else "no record axis"
        problems.append(f"{ref.array}, chunk {ref.key}, {where}: {'; '.join(w for w in (why, failure) if w)}")
        files.append(fsio.join(s.path, *ref.array.split("/"), *ref.key.split("/")))
        shards_hit.update(shards)
        fixed |= not shards
        if failure:
            unreadable.update(shards)
    notes = [f"not covered by chunk digests (a store written before they existed): {', '.join(uncovered)}; "
             f"their chunks were decoded and checked"] if uncovered else []
    return problems, notes, shards_hit, unreadable, files, fixed


def check_store(path: str) -> StoreCheck:
    """Every problem found in the store at ``path``: structure and records, each chunk's bytes
    against the digests recorded at commit (before any decoding), the decoded rows (see the
    module docstring) and the rejects parts. Never raises for a damaged store."""
    try:
        s = EmbeddingStore(path)
    except StoreError as exc:
        return StoreCheck((str(exc),))
    problems = s.validate()
    if problems:  # shapes or records are broken: row-level checks would only repeat it
        return StoreCheck(tuple(problems), rows=s.rows)
    records = sorted(s.attrs["shards"].values(), key=lambda r: r["index"])
    chunk_problems, notes, shards_hit, unreadable, files, fixed = _check_chunk_bytes(s, records)
    s.check_digests = False  # compared above; chunks that do not decode are skipped through ``unreadable``
    damaged_parts: list[int] = []
    rows = _check_shards(s, frozenset(unreadable))
    rejects = _check_rejects(s, damaged_parts)
    files += [rejects_part_path(s.path, i) for i in damaged_parts]
    damaged = shards_hit | set(damaged_parts)
    labelled = s.labelled if LABELLED_ATTR in s.attrs or not unreadable else -1  # older stores: counted from latlon
    hierarchy = _check_hierarchy(s, notes)
    rebuild = [p for p in rejects if p.endswith(_REBUILD)] + hierarchy
    return StoreCheck(tuple(rows + rejects + chunk_problems + hierarchy), tuple(notes), tuple(sorted(damaged)), tuple(files),
                      fixed, s.rows, labelled, tuple(rebuild))


def _check_hierarchy(s: EmbeddingStore, notes: list[str]) -> list[str]:
    """Problems of the consolidated metadata (each ending in the repair advice); notes on its absence
    and on temporary files that killed writes left."""
    status, problems = consolidated_status(s.path, s._group, s.rows)
    if status == "absent":
        notes.append("no consolidated metadata (a store written before geopipe kept it): xarray warns when opening it; "
                     "`geopipe store repair` adds it (so does the next extract/import that writes to the store)")
    leftovers = stale_temporaries(s.path)
    if leftovers:
        notes.append(f"{len(leftovers)} temporary file(s) of killed writes (first: {leftovers[0]}); the next extract, "
                     f"import or `geopipe store repair` removes them")
    return [f"{p}; `geopipe store repair` rewrites it" for p in problems[:_SHOWN]] + (
        [f"consolidated metadata: {len(problems) - _SHOWN} more differences; `geopipe store repair` rewrites it"]
        if len(problems) > _SHOWN else [])


def verify_store(path: str) -> list[str]:
    """Every problem found in the store at ``path`` (empty list = valid); see :func:`check_store`."""
    return list(check_store(path).problems)

"""Distributed extraction: Dask workers embed whole shards into staged fragments, the client
commits them in shard order.

Worker side (:func:`stage_shard`): decode and embed one whole shard
(:func:`geopipe.pipeline.ingest.embed.shard_rows`, the same batches and forward passes as the
single-process loop) with a backbone loaded once per worker process, and write the rows as a
*fragment* next to the store::

    STORE/.staging/<record index>-<id>/embeddings.npy   (n, D) raw embeddings, tar order
                                       rows.json        keys, sample indices, lat/lon (degrees),
                                                        meta, rejects, the shard's sha256
                                       done.json        completion marker, written last: the shard's
                                                        url, size, mtime and each file's size and sha256

``<id>`` hashes the shard's url, size and mtime and every option the embeddings depend on
(backbone, batch size, precision, sample spec, device), so a fragment is reused only by a run
that would compute the same bytes. Every file is written atomically (:mod:`geopipe.pipeline.core.fsio`,
so fragments work on fsspec urls: the shared storage of a real cluster).

Client side (:func:`embed_distributed`): submit shards a bounded window ahead of the next one to
commit, and as soon as that next shard's fragment is complete read it back (one fragment in
memory at a time), delete it and commit it through :func:`geopipe.pipeline.ingest.rows.commit_rows`
— the store's ordinary completion records — so the store equals a single-process run's. A
worker killed mid-shard has its task rerun by Dask; a killed client resumes like any extract:
committed shards are skipped by the plan, complete fragments are reused, partial ones redone.
A fragment is trusted only when every file's sha256 matches the digest its worker wrote in
``done.json``: a damaged one (bytes changed in place, same size) is redone, never committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.parallel import tune_worker_process
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.ingest.decode import SampleSpec
from geopipe.pipeline.ingest.images import ImageSource
from geopipe.pipeline.ingest.rows import ShardRows, commit_rows
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["STAGING_DIR", "StageJob", "FragmentDamaged", "fragment_name", "write_fragment", "read_fragment",
           "fragment_complete", "worker_identity", "stage_shard", "embed_distributed", "remove_staging"]

#: Folder of the staged fragments inside the store (gone once every shard is committed).
STAGING_DIR = ".staging"
_EMB, _ROWS, _DONE = "embeddings.npy", "rows.json", "done.json"
_BACKBONES: dict = {}  # this (worker) process's loaded backbones: (name, pretrained, device) → Backbone
_MAX_REDO = 2  # times one shard's fragment is redone after it was found damaged, before the run stops


class FragmentDamaged(GeopipeError):
    """A staged fragment's files do not match the digests its worker wrote (or are missing)."""


@dataclass(frozen=True)
class StageJob:
    """What a worker needs to embed a shard (small and picklable).

    backbone, pretrained: the backbone to load (ignored when ``spec.embedding_key`` is set);
    device: "auto", "cpu", "cuda" or "cuda:N" as resolved on the worker ("auto"/"cuda" on a
    worker of a LocalCluster that sees several GPUs: worker i uses GPU i mod count);
    embed_dim: D of the store (set once the store is open); labels: how image files are
    labelled (:data:`geopipe.pipeline.ingest.images.LABELS`). CPU threads per worker: a
    LocalCluster's workers start with cores // N (:func:`geopipe.pipeline.core.parallel.dask_client`).
    """

    backbone: str
    pretrained: str | None
    spec: SampleSpec
    batch_size: int
    precision: str
    device: str = "auto"
    embed_dim: int | None = None
    labels: str = "auto"

    def signature(self) -> str:
        """Hex digest of every option the embeddings depend on."""
        fields = dataclasses.asdict(self)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def fragment_name(index: int, url: str, stat: ShardStat, job: StageJob) -> str:
    """``<record index>-<id>``: the folder of shard ``url`` under ``STORE/.staging``."""
    ident = json.dumps([url, stat.size, stat.mtime, job.signature()])
    return f"{index:06d}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _worker_device(name: str):
    import torch

    from geopipe.pipeline.core.device import resolve_device

    if name in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            worker = get_worker().name
        except (ImportError, ValueError):
            worker = None
        if isinstance(worker, int):  # a LocalCluster names its workers 0..N-1: one GPU each
            return torch.device(f"cuda:{worker % torch.cuda.device_count()}")
    return resolve_device(name)


def _backbone(job: StageJob):
    """This process's backbone for ``job`` (loaded on first use)."""
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    device = _worker_device(job.device)
    key = (job.backbone, job.pretrained, str(device))
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(BackboneSpec(job.backbone, job.pretrained), device=device)
    return _BACKBONES[key]


def worker_identity(job: StageJob) -> tuple[dict, int]:
    """(backbone identity, embedding width D), on a worker (which keeps the backbone loaded)."""
    tune_worker_process()
    bb = _backbone(job)
    return bb.identity, bb.embed_dim


def write_fragment(frag: str, url: str, stat: ShardStat, rows: ShardRows, sha256: str | None, n_samples: int) -> None:
    """Write one shard's rows as the fragment folder ``frag``; the marker goes last."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows.embeddings), allow_pickle=False)
    body = {"url": url, "sha256": sha256, "n_samples": n_samples, "idx": [int(i) for i in rows.idx], "keys": rows.keys,
            "latlon": [[float(a), float(b)] for a, b in rows.latlon], "meta": rows.meta,
            "rejects": [[int(i), r.key, r.shard, r.reason, r.detail] for i, r in rows.rejects]}
    files = {_EMB: buf.getvalue(), _ROWS: json.dumps(body, ensure_ascii=False).encode()}
    for name, data in files.items():
        fsio.write_atomic(fsio.join(frag, name), data)
    done = {"url": url, "size": stat.size, "mtime": stat.mtime, "bytes": {k: len(v) for k, v in files.items()},
            "sha256": {k: hashlib.sha256(v).hexdigest() for k, v in files.items()}}
    fsio.write_atomic(fsio.join(frag, _DONE), json.dumps(done).encode())


def _verified_files(frag: str) -> tuple[dict, dict[str, bytes]]:
    """(done.json, {file name: bytes}) of ``frag``, each file checked against its size and sha256
    in ``done.json``; FragmentDamaged naming the file that is missing or differs."""
    try:
        done = json.loads(fsio.read_bytes(fsio.join(frag, _DONE)))
        digests, sizes = dict(done["sha256"]), dict(done["bytes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FragmentDamaged(f"staged fragment {frag}: no readable completion marker ({type(err).__name__})") from None
    files = {}
    for name in (_EMB, _ROWS):
        try:
            data = fsio.read_bytes(fsio.join(frag, name))
        except OSError:
            raise FragmentDamaged(f"staged fragment {frag}: {name} is missing") from None
        if len(data) != sizes.get(name) or hashlib.sha256(data).hexdigest() != digests.get(name):
            raise FragmentDamaged(f"staged fragment {frag}: {name} does not match the sha256 its worker wrote")
        files[name] = data
    return done, files


def fragment_complete(frag: str, url: str, stat: ShardStat) -> bool:
    """True when ``frag`` holds a finished fragment of this version of shard ``url`` whose files
    match the digests its worker wrote (reads the files)."""
    try:
        done, _ = _verified_files(frag)
    except FragmentDamaged:
        return False
    return (done.get("url"), done.get("size"), done.get("mtime")) == (url, stat.size, stat.mtime)


def read_fragment(frag: str) -> tuple[ShardRows, str | None, int]:
    """A fragment → (rows, shard sha256, samples read); FragmentDamaged when a file does not match
    its digest (so damaged rows are never committed)."""
    _, files = _verified_files(frag)
    emb = np.load(io.BytesIO(files[_EMB]), allow_pickle=False)
    body = json.loads(files[_ROWS])
    rows = ShardRows(idx=body["idx"], keys=body["keys"], latlon=[tuple(x) for x in body["latlon"]], meta=body["meta"],
                     embeddings=emb, rejects=[(i, Reject(k, s, r, d)) for i, k, s, r, d in body["rejects"]])
    return rows, body["sha256"], int(body["n_samples"])


def stage_shard(job: StageJob, url: str, stat: ShardStat, frag: str, image: ImageSource | None = None) -> str:
    """On a worker: embed shard ``url`` (a tar, or the image files ``image``) into the fragment
    ``frag`` (unless a rerun of this task finds it complete); returns ``frag`` (the client reads
    the rows from there, not the reply)."""
    from geopipe.pipeline.ingest.embed import shard_rows
    from geopipe.pipeline.ingest.sources import SampleReader

    tune_worker_process()  # glibc's malloc thresholds on workers a Dask nanny started (once per process)
    if not fragment_complete(frag, url, stat):
        bb = _backbone(job) if job.spec.embedding_key is None else None
        reader = (SampleReader({url: image}, job.labels, job.spec.lat_key, job.spec.lon_key, job.spec.max_member_bytes)
                  if image is not None else None)
        rows, sha256, n = shard_rows(url, bb, job.spec, job.batch_size, job.precision, int(job.embed_dim), reader)
        write_fragment(frag, url, stat, rows, sha256, n)
    return frag


def _remove_tree(url: str) -> None:
    url = fsio.normalize(url)
    if fsio.is_local(url):
        shutil.rmtree(url, ignore_errors=True)
    else:
        fs, path = fsio.url_to_fs(url)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def remove_staging(store: str) -> None:
    """Delete ``STORE/.staging`` and every fragment in it (nothing when it is absent)."""
    staging = fsio.join(fsio.normalize(store), STAGING_DIR)
    if fsio.exists(staging):
        _remove_tree(staging)


def embed_distributed(todo: Sequence[tuple[str, ShardStat]], writer: StoreWriter, job: StageJob, client,
                      on_commit: Callable[[str, int, list[Reject]], None] = lambda url, n, rej: None, *,
                      progress: bool = True, window: int | None = None,
                      images: Mapping[str, ImageSource] | None = None) -> None:
    """Embed the shards ``todo`` [(url, stat)] on the Dask ``client``'s workers and append each
    to ``writer`` in order (see the module docstring); ``on_commit`` as in
    :func:`geopipe.pipeline.ingest.embed.embed_shards`.

    window: shards submitted ahead of the next one to commit (default: 2 per worker, at least
    4) — bounds the staged fragments on disk; this process holds one fragment at a time.
    images: url → the image files of the sources that are image folders (each task gets its own).
    """
    from dask.distributed import as_completed

    job = dataclasses.replace(job, embed_dim=int(writer.attrs["embed_dim"]))
    staging, base = fsio.join(writer.path, STAGING_DIR), len(writer.shards)
    names = [fragment_name(base + i, url, stat, job) for i, (url, stat) in enumerate(todo)]
    frags = [fsio.join(staging, name) for name in names]
    wanted, present = set(names), fsio.listdir(staging)
    for name in present:  # fragments of other options or shard versions, or of committed shards
        if name not in wanted:
            _remove_tree(fsio.join(staging, name))
    window = window or max(4, 2 * len(client.scheduler_info().get("workers", {})))
    ready = {i for i, f in enumerate(frags) if names[i] in present and fragment_complete(f, *todo[i])}
    pending, queue, redone = {}, as_completed(), {}  # future key → (todo position, future); position → redos

    def submit(i: int) -> None:
        url, stat = todo[i]
        fut = client.submit(stage_shard, job, url, stat, frags[i], (images or {}).get(url), pure=False)
        pending[fut.key] = (i, fut)
        queue.add(fut)

    total_bytes, bytes_done, nxt, submitted = sum(s.size for _, s in todo), 0, 0, 0
    bar = Progress(None, "extract", "img", enabled=progress)
    try:
        while nxt < len(todo):
            while submitted < len(todo) and submitted < nxt + window:
                if submitted not in ready:
                    submit(submitted)
                submitted += 1
            if nxt not in ready:
                fut = next(queue)
                fut.result()  # a task that failed (Dask already retried it on another worker) raises here
                ready.add(pending.pop(fut.key)[0])
                fut.release()
                continue
            url, stat = todo[nxt]
            try:
                rows, sha256, n_samples = read_fragment(frags[nxt])
            except FragmentDamaged as err:  # changed since its worker wrote it: redo the shard, never commit it
                redone[nxt] = redone.get(nxt, 0) + 1
                if redone[nxt] > _MAX_REDO:
                    raise GeopipeError(f"{err} (after {_MAX_REDO} redos of shard {url}); check the storage under "
                                       f"{staging}") from None
                _remove_tree(frags[nxt])
                ready.discard(nxt)
                submit(nxt)
                continue
            _remove_tree(frags[nxt])  # before the commit: a crash in between redoes the shard, never leaves it staged
            n_ok, rejects = commit_rows(writer, url, dataclasses.replace(stat, sha256=sha256), rows)
            del rows
            bytes_done += stat.size
            bar.update(n_samples)
            if bytes_done and total_bytes:  # ETA from the shards' bytes per image so far
                bar.total = max(bar.n, int(bar.n * total_bytes / bytes_done))
            nxt += 1
            bar.set_postfix(shards=f"{nxt}/{len(todo)}")
            on_commit(url, n_ok, rejects)
    finally:
        bar.close()
        for _, fut in pending.values():  # a failed run: stop the work still queued
            fut.cancel()
    if not fsio.listdir(staging):
        remove_staging(writer.path)

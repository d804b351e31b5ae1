"""The extraction loop: decoded shard parts → embeddings → store, committing shards in order.

Decoding runs in DataLoader workers (:class:`geopipe.pipeline.ingest.decode.ShardBatches`, each
worker owning whole shards); the main process embeds each batch and appends a shard once all
its parts are in, strictly in shard order, so the store does not depend on ``num_workers``.

On CUDA the batches arrive in pinned memory and the loop keeps one batch in flight: the
host→device copy, the forward pass and the device→host copy of batch i are queued
asynchronously, and the CPU assembles and commits batch i-1 meanwhile, so the backbone is the
bottleneck rather than Python or the store writes. Precomputed embeddings (``.npy`` entries,
``backbone=None``) skip the model entirely.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.core.lifetime import die_with_parent, forkserver_dies_with_owner, terminate_on_sigterm
from geopipe.pipeline.core.progress import Progress
from geopipe.pipeline.ingest.decode import SampleSpec, ShardBatches
from geopipe.pipeline.ingest.rows import ShardRows, commit_rows
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.rejects import Reject
from geopipe.pipeline.store.writer import StoreWriter

__all__ = ["LoopOptions", "embed_shards", "shard_rows"]


@dataclass(frozen=True)
class LoopOptions:
    """batch_size: images per forward pass; num_workers: decode processes (0 = in the main
    process); precision: :data:`geopipe.pipeline.vision.backbones.PRECISIONS`; prefetch_factor: batches each
    worker decodes ahead; progress: images done / total on stderr (:class:`geopipe.pipeline.core.progress.Progress`)."""

    batch_size: int = 256
    num_workers: int = 2
    precision: str = "auto"
    prefetch_factor: int = 2
    progress: bool = True


def _identity(x):
    return x


def _launch(backbone, images: torch.Tensor | None, precision: str, embed_dim: int):
    """Start embedding one batch; returns a handle for :func:`_collect` (no sync on CUDA)."""
    if images is None:
        return np.zeros((0, embed_dim), np.float32), None
    if backbone is None:  # precomputed (b, D) embeddings
        return images.numpy(), None
    z = backbone.encode(images, precision)
    if z.device.type != "cuda":
        return z.numpy(), None
    host = torch.empty(z.shape, dtype=z.dtype, pin_memory=True)
    host.copy_(z, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


def _collect(handle) -> np.ndarray:
    out, done = handle
    if done is not None:
        done.synchronize()
        out = out.numpy()
    return out


def _rows(parts: list) -> tuple[ShardRows, str | None]:
    """A finished shard's parts [(seq, part, (b, D) embeddings)] → rows in tar order, sha256."""
    parts = sorted(parts, key=lambda p: p[0])
    rows = ShardRows(
        idx=[i for _, p, _ in parts for i in p["idx"]],
        keys=[k for _, p, _ in parts for k in p["keys"]],
        latlon=[ll for _, p, _ in parts for ll in p["latlon"]],
        meta=[m for _, p, _ in parts for m in p["meta"]],
        embeddings=np.concatenate([e for _, _, e in parts], axis=0),
        rejects=[r for _, p, _ in parts for r in p["rejects"]],
    )
    return rows, parts[-1][1].get("sha256")


def shard_rows(url: str, backbone, spec: SampleSpec, batch_size: int, precision: str,
               embed_dim: int, samples: Callable | None = None) -> tuple[ShardRows, str | None, int]:
    """Decode and embed one whole shard in this process → (its rows in tar order, sha256 hex of
    the shard file or None, samples read = rows + rejects).

    The same parts (``batch_size`` rows, never spanning shards) and forward passes as
    :func:`embed_shards`, so the rows equal what that loop commits for ``url``: a Dask worker
    (:mod:`geopipe.pipeline.ingest.distributed`) stages them and the client commits them.
    backbone None reads ``spec.embedding_key`` entries of width ``embed_dim`` instead. A thread
    decodes the next parts while the backbone runs (a Dask worker may not start processes), and
    on CUDA one batch stays in flight as in :func:`embed_shards`. samples: the url's sample reader
    (:class:`~geopipe.pipeline.ingest.decode.ShardBatches`; default: a tar).
    """
    preprocess = backbone.preprocess if backbone is not None else None
    parts, n_samples, in_flight = [], 0, None
    for part in _decoded_ahead(ShardBatches([url], preprocess, spec, batch_size, embed_dim=embed_dim, samples=samples)):
        handle = _launch(backbone, part.pop("images"), precision, embed_dim)
        if in_flight is not None:
            parts.append((in_flight[0]["seq"], in_flight[0], _collect(in_flight[1])))
        in_flight = (part, handle)
        n_samples += part["n_samples"]
    if in_flight is not None:
        parts.append((in_flight[0]["seq"], in_flight[0], _collect(in_flight[1])))
    rows, sha256 = _rows(parts)
    return rows, sha256, n_samples


def _decoded_ahead(parts, depth: int = 2):
    """Iterate ``parts`` (decoded in a daemon thread, at most ``depth`` ahead), in order; an
    exception in the thread is raised here; leaving early stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(entry) -> bool:  # False once the consumer has left
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in parts:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # handed to the consumer, which raises it with its traceback
            put((end, exc))

    threading.Thread(target=produce, name="geopipe-decode-ahead", daemon=True).start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is end:
                return
            yield item
    finally:
        stop.set()


def _worker_init(owner: int, worker_id: int) -> None:
    """DataLoader worker start: die with the forkserver (its parent) and with the extract process."""
    die_with_parent(owner)


def _loader(dataset: ShardBatches, n_shards: int, opts: LoopOptions, device: torch.device):
    workers = min(opts.num_workers, n_shards)
    # forkserver: workers start from a clean process, not a fork of a host that may run threads
    # (an orchestrator's event loop, logging handlers) whose state breaks forked children
    extra = {}
    if workers > 0:
        forkserver_dies_with_owner()  # a killed extract takes its forkserver and decode workers along
        extra = {"prefetch_factor": opts.prefetch_factor, "multiprocessing_context": "forkserver",
                 "worker_init_fn": functools.partial(_worker_init, os.getpid())}
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, collate_fn=_identity,
                                       pin_memory=device.type == "cuda", **extra)


@terminate_on_sigterm()  # SIGTERM unwinds through the loader, which shuts its workers down
def embed_shards(todo: Sequence[tuple[str, ShardStat]], writer: StoreWriter, backbone, spec: SampleSpec,
                 opts: LoopOptions, device: torch.device,
                 on_commit: Callable[[str, int, list[Reject]], None] = lambda url, n, rej: None,
                 samples: Callable | None = None) -> None:
    """Embed the shards ``todo`` [(url, stat)] and append each to ``writer`` in order.

    backbone: a :class:`geopipe.pipeline.vision.backbones.Backbone`, or None to read ``spec.embedding_key``
    entries as the embeddings. on_commit(url, rows kept, rejects) runs after each shard's
    commit (counting, reject-budget checks; an exception there stops the loop, committed
    shards stay). samples(url, info): each url's samples (default: tars;
    :class:`geopipe.pipeline.ingest.sources.SampleReader` for image folders).
    """
    embed_dim = int(writer.attrs["embed_dim"])
    preprocess = backbone.preprocess if backbone is not None else None
    dataset = ShardBatches([u for u, _ in todo], preprocess, spec, opts.batch_size, embed_dim=embed_dim, samples=samples)
    total_bytes, bytes_done, images_done = sum(s.size for _, s in todo), 0, 0
    bar = Progress(None, "extract", "img", enabled=opts.progress)
    pending: dict[int, list] = {}  # shard position → [(seq, part, embeddings)] until its last part
    done, nxt, in_flight = set(), 0, None

    def finish(part, handle) -> None:
        nonlocal nxt, bytes_done, images_done
        pending.setdefault(part["shard"], []).append((part["seq"], part, _collect(handle)))
        done.update([part["shard"]] if part["last"] else [])
        bar.update(part["n_samples"])
        while nxt in done:
            url, stat = todo[nxt]
            parts = pending.pop(nxt)
            images_done += sum(p["n_samples"] for _, p, _ in parts)
            rows, sha256 = _rows(parts)
            n_ok, rejects = commit_rows(writer, url, dataclasses.replace(stat, sha256=sha256), rows)
            bytes_done += stat.size
            if bytes_done and total_bytes:  # ETA from the committed shards' bytes per image (not later shards' parts)
                bar.total = max(bar.n, round(images_done * total_bytes / bytes_done))
            nxt += 1
            on_commit(url, n_ok, rejects)

    try:
        for part in _loader(dataset, len(todo), opts, device):
            images = part.pop("images")  # not buffered: a shard's decoded images can be gigabytes
            handle = _launch(backbone, images, opts.precision, embed_dim)
            if in_flight is not None:
                finish(*in_flight)
            in_flight = (part, handle)
        if in_flight is not None:
            finish(*in_flight)
    finally:
        bar.close()

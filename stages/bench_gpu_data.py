"""The data-plane checks of ``geopipe bench --what gpu``: extract (autocast encode), retrieval
(torch backend, a bare device matmul + top-k, faiss on the GPU when installed) and ``--dask
local:N`` (the device each worker resolves, extract on the cluster vs one process), each
compared with the CPU path (tolerances in each row)."""

from __future__ import annotations

import copy
import os
import tempfile
import time

import numpy as np
import torch

from geopipe.stages.bench_gpu_spec import GpuBenchConfig, GpuCheck, best_time, gpu_check_row, sync

__all__ = ["check_extract", "check_retrieval", "check_dask", "worker_device_probe"]

#: Tolerances of the CPU comparisons.
EMBED_MIN_COS = 0.99  # autocast (bf16/fp16) embeddings vs float32 CPU ones, per image
TOP1_MIN = 0.999  # share of queries whose best neighbour equals the CPU path's


def check_extract(cfg: GpuBenchConfig, device) -> list:
    """bench_extract (the extract loop vs bare encode of pre-made batches, same model, batch,
    precision); the backbone's autocast embeddings of ``agree`` images vs float32 on the CPU."""
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone
    from geopipe.pipeline.vision.spec import Backbone
    from geopipe.stages.bench_extract import bench_extract

    s = cfg.sizes
    r = bench_extract(backbone=s.backbone, pretrained=s.pretrained, device=str(device), batch_size=s.image_batch,
                      num_workers=s.decode_workers, n_images=s.images, n_shards=s.shards, image_px=s.image_px, precision=s.precision,
                      rss_shards=(), workdir=cfg.workdir)
    torch.manual_seed(0)
    bb = load_backbone(BackboneSpec(s.backbone, s.pretrained), device=device)
    cpu = Backbone(copy.deepcopy(bb.model).to("cpu").float(), bb.preprocess, bb.embed_dim, bb.identity)
    size = bb.identity["preprocess"]["size"]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(s.agree, 3, h, w, generator=torch.Generator().manual_seed(0))
    cos = torch.nn.functional.cosine_similarity(bb.encode(x, s.precision).cpu().double(), cpu.encode(x, "fp32").double(), dim=-1)
    worst = float(cos.min())
    return [gpu_check_row("extract", f"extract loop, {s.backbone} ({s.pretrained or 'random'}), {s.image_px} px, batch {s.image_batch}, "
                          f"{s.decode_workers} decode workers", unit="images/s", measured=r["extract_images_per_s"],
                          baseline=r["bare_images_per_s"], ratio=r["ratio"], at_least=0.9, agreed=worst >= EMBED_MIN_COS,
                          agreement=f"min cosine {worst:.4f} >= {EMBED_MIN_COS:g} ({s.precision} vs fp32 CPU)",
                          details={"bare_before_after": r["bare_before_after"], "images": r["n_images"]})]


def _database(s) -> tuple[np.ndarray, np.ndarray]:
    from geopipe.stages.bench_retrieval import generate_database

    return generate_database(s.db_rows, s.db_dim, seed=0), generate_database(s.queries, s.db_dim, seed=1).astype(np.float32)


def _bare_topk(q: torch.Tensor, chunks: list, k: int) -> torch.Tensor:
    """The baseline: float32 matmul + torch.topk per chunk, merged by another top-k (any device)."""
    best_v = torch.full((q.shape[0], k), -float("inf"), device=q.device)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)
    for start, emb in chunks:
        v, i = torch.topk(q @ emb.float().T, min(k, emb.shape[0]), dim=1)
        cv, ci = torch.cat([best_v, v], 1), torch.cat([best_i, i + start], 1)
        best_v, j = torch.topk(cv, k, dim=1)
        best_i = torch.gather(ci, 1, j)
    return best_i


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.asarray(a)[:, 0] == np.asarray(b)[:, 0]))


def check_retrieval(cfg: GpuBenchConfig, device) -> list:
    """Queries/s of the torch backend (blocked_topk: float32 matmul on the CPU, as ``geopipe
    retrieve`` runs it) vs a bare CPU loop; the bare loop on the device; faiss (on the GPU when
    its build has GPU support). Neighbours compared with the torch backend's (top-1 share)."""
    from geopipe.pipeline.core.provenance import install_hint
    from geopipe.pipeline.retrieval.index import faiss_available
    from geopipe.pipeline.retrieval.search import array_chunks, blocked_topk

    s, cpu = cfg.sizes, torch.device("cpu")
    db, q = _database(s)
    step = 65536
    ref = {}
    t_torch = best_time(lambda: ref.setdefault("i", blocked_topk(q, array_chunks(db, step), s.k).indices), 1, cpu)
    cpu_chunks = [(a, torch.from_numpy(np.ascontiguousarray(db[a:a + step]))) for a in range(0, len(db), step)]
    bare_cpu = {}
    t_bare = best_time(lambda: bare_cpu.setdefault("i", _bare_topk(torch.from_numpy(q), cpu_chunks, s.k).numpy()), 1, cpu)
    rows = [gpu_check_row("retrieval", f"torch backend (CPU), {s.queries} queries x {s.db_rows:,} x {s.db_dim} float16, k {s.k}",
                          unit="queries/s", measured=s.queries / t_torch, baseline=s.queries / t_bare, ratio=t_bare / t_torch, at_least=0.9,
                          agreed=_top1(bare_cpu["i"], ref["i"]) >= TOP1_MIN,
                          agreement=f"top-1 same as bare CPU loop: {_top1(bare_cpu['i'], ref['i']):.4f} >= {TOP1_MIN:g}")]
    rows.append(_device_row(cfg, device, cpu_chunks, q, ref["i"], t_torch))  # its device copies are freed on return
    rows.append(_faiss_row(cfg, device, db, q, ref["i"], t_torch) if faiss_available() else
                GpuCheck("retrieval", "faiss", verdict="skipped", details={"reason": f"faiss is not installed ({install_hint('faiss')})"}))
    return rows


def _device_row(cfg, device, cpu_chunks, q, ref, t_torch) -> GpuCheck:
    """The bare loop on ``device`` (database uploaded once, float16; the upload is not timed)."""
    s = cfg.sizes
    t0 = time.perf_counter()
    chunks = [(a, e.to(device)) for a, e in cpu_chunks]
    qd = torch.from_numpy(q).to(device)
    sync(device)
    upload = time.perf_counter() - t0
    _bare_topk(qd[:8], chunks, s.k)  # warm-up
    got = {}
    t = best_time(lambda: got.setdefault("i", _bare_topk(qd, chunks, s.k).cpu().numpy()), s.repeats, device)
    return gpu_check_row("retrieval", f"bare matmul + top-k on {device} (speed-up over the torch backend)", unit="queries/s",
                         measured=s.queries / t, baseline=s.queries / t_torch, ratio=t_torch / t, agreed=_top1(got["i"], ref) >= TOP1_MIN,
                         agreement=f"top-1 same as torch backend: {_top1(got['i'], ref):.4f} >= {TOP1_MIN:g}",
                         details={"upload_s": round(upload, 3), "note": "the retrieve stage has no CUDA path for the torch backend"})


def _faiss_row(cfg, device, db, q, ref, t_torch) -> GpuCheck:
    from geopipe.pipeline.retrieval.index import FaissIndex, faiss_gpus
    from geopipe.pipeline.retrieval.search import array_chunks

    s = cfg.sizes
    on_gpu = device.type == "cuda" and faiss_gpus() > 0
    t0 = time.perf_counter()
    index = FaissIndex(array_chunks(db, 65536), s.db_dim, "ip", device=str(device))
    build = time.perf_counter() - t0
    got = {}
    t = best_time(lambda: got.setdefault("i", index.search(q, s.k).indices), s.repeats, device)
    return gpu_check_row("retrieval", f"faiss IndexFlatIP on {'GPU' if on_gpu else 'CPU'} (speed-up over the torch backend)",
                         unit="queries/s", measured=s.queries / t, baseline=s.queries / t_torch, ratio=t_torch / t,
                         agreed=_top1(got["i"], ref) >= TOP1_MIN, agreement=f"top-1 same as torch backend: {_top1(got['i'], ref):.4f}",
                         details={"build_s": round(build, 2), "faiss_gpus": faiss_gpus()})


def worker_device_probe(device: str) -> tuple:
    """In a task on a Dask worker: (worker name, the device extract's tasks resolve for ``device``)."""
    from distributed import get_worker

    from geopipe.pipeline.ingest.distributed import _worker_device  # the rule under test: worker i → GPU i mod count

    return get_worker().name, str(_worker_device(device))


def _expected_device(name, device: str) -> str:
    from geopipe.pipeline.core.device import resolve_device

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device in ("auto", "cuda") and count > 1 and isinstance(name, int):
        return f"cuda:{name % count}"
    return str(resolve_device(device))


def check_dask(cfg: GpuBenchConfig, device) -> list:
    """``--dask local:N``: each worker's device (worker i → GPU i mod count; one GPU: all on it),
    and extract of the same shards on that running cluster (after a warm-up run that loads the
    backbone in every worker) vs in this process (stores identical)."""
    from geopipe.pipeline.core.parallel import dask_client
    from geopipe.pipeline.store.reader import read_store
    from geopipe.stages.bench_extract import write_bench_shards
    from geopipe.stages.extract import ExtractConfig, run_extract

    s = cfg.sizes
    dev = "cuda" if device.type == "cuda" and device.index is None else str(device)
    t0 = time.perf_counter()
    with dask_client(f"local:{s.dask_workers}") as client, tempfile.TemporaryDirectory(dir=cfg.workdir) as tmp:
        start = time.perf_counter() - t0
        addresses = sorted(client.scheduler_info()["workers"])  # one task per worker, as extract's tasks run there
        probes = sorted(client.gather([client.submit(worker_device_probe, dev, workers=[a], allow_other_workers=False, pure=False)
                                       for a in addresses]), key=str)
        pinned = all(got == _expected_device(name, dev) for name, got in probes)
        shards = write_bench_shards(os.path.join(tmp, "shards"), s.shards, -(-s.dask_images // s.shards), min(s.image_px, 128))
        runs = {}  # "warm": every worker imports the backbone's code and loads it once, untimed
        for name, spec in (("single", None), ("warm", client.scheduler.address), ("dask", client.scheduler.address)):
            c = ExtractConfig(shards=tuple(shards), store=os.path.join(tmp, f"{name}.zarr"), backbone=s.backbone, pretrained=s.pretrained,
                              batch_size=s.image_batch, num_workers=s.decode_workers, device=dev, precision=s.precision, progress=False,
                              dask=spec)
            runs[name] = run_extract(c).images_per_s
        a, b = read_store(os.path.join(tmp, "single.zarr")), read_store(os.path.join(tmp, "dask.zarr"))
        same = a.keys.tolist() == b.keys.tolist() and np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.latlon, b.latlon)
    return [gpu_check_row("dask", f"local:{s.dask_workers} worker devices", unit="s cluster start", measured=start, agreed=pinned,
                          agreement="workers on " + ", ".join(f"{n}: {d}" for n, d in probes), details={"probes": probes}),
            gpu_check_row("dask", f"extract on local:{s.dask_workers} vs one process, {s.dask_images} images", unit="images/s",
                          measured=runs["dask"], baseline=runs["single"], ratio=runs["dask"] / runs["single"], at_least=0.9,
                          agreed=bool(same), agreement=f"stores identical: {bool(same)}")]

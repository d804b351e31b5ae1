"""Scale-out benchmarks, each against a bare baseline measured in the same run.

* ``bench_stream_train``: training steps/s streaming batches from a store on disk
  (:class:`geopipe.pipeline.store.stream.StoreStream`) vs a bare loop drawing batches from
  tensors already in memory (same network, batch, objective). Ratio = stream / bare; the
  stream's buffer high-water mark and the process's peak RSS are reported with it.
* ``bench_dask_predict``: ``geopipe predict`` on a 2-worker LocalCluster vs in process
  (records/s both; overhead = 1 − in-process time / Dask time, for a cluster started and stopped
  by the run and for one already running with warm workers).
* ``bench_import``: ``geopipe import`` of a clip-retrieval folder (N × D float32) vs a bare
  ``np.load`` + normalise + zarr write of the same arrays (rows/s; ratio = bare time / import time)
  and the peak RSS of each, each run in a fresh process.

Each writes its synthetic inputs under ``workdir`` (sizes in the config) and reports a dict.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["ScaleBenchConfig", "bench_stream_train", "bench_dask_predict", "bench_import"]


@dataclass(frozen=True)
class ScaleBenchConfig:
    """Sizes: ``rows`` × ``dim`` float16 store for training/predict benchmarks, ``import_rows`` ×
    ``import_dim`` float32 for the import one; ``steps`` training steps of a ``net_dim`` × ``depth``
    network at ``batch``; ``predict_steps`` sampling steps."""

    workdir: str
    rows: int = 200_000
    dim: int = 512
    chunk_rows: int = 4096
    net_dim: int = 256
    depth: int = 4
    batch: int = 1024
    steps: int = 100
    predict_rows: int = 20_000
    predict_steps: int = 8
    import_rows: int = 80_689
    import_dim: int = 512
    seed: int = 0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb() -> float:
    """This process's own peak RSS (MB): VmHWM, which an exec resets (ru_maxrss keeps the
    forking parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        return _peak_rss_mb()


def _make_store(path: str, rows: int, dim: int, chunk_rows: int, seed: int) -> str:
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    if os.path.exists(os.path.join(path, "zarr.json")):
        return path
    rng = np.random.default_rng(seed)
    ident = {"name": "bench", "pretrained": None, "embed_dim": dim, "preprocess": {}, "fingerprint": "bench"}
    shard = 10 * chunk_rows
    with StoreWriter.open(path, backbone=ident, embed_dim=dim, dtype="float16", chunk_rows=chunk_rows) as w:
        for s in range(0, rows, shard):
            n = min(shard, rows - s)
            ll = np.column_stack([rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)])
            w.append_shard(f"bench-{s}", rng.normal(size=(n, dim)).astype(np.float32), ll, [f"r{i}" for i in range(s, s + n)],
                           {}, [], ShardStat(n, 0.0))
    return path


def bench_stream_train(cfg: ScaleBenchConfig) -> dict:
    """Steps/s of the training step fed by a StoreStream vs by in-memory tensors."""
    import torch

    from geopipe.pipeline.methods.registry import get_method
    from geopipe.pipeline.model.network import NetworkConfig
    from geopipe.pipeline.sphere.geometry import latlon_to_xyz
    from geopipe.pipeline.store.reader import read_store
    from geopipe.pipeline.store.stream import StoreStream
    from geopipe.pipeline.train.loop import TensorBatches

    path = _make_store(os.path.join(cfg.workdir, "bench-train.zarr"), cfg.rows, cfg.dim, cfg.chunk_rows, cfg.seed)
    method = get_method("rfm")
    net = NetworkConfig(input_dim=3, dim=cfg.net_dim, depth=cfg.depth, expansion=4, cond_dim=cfg.dim)

    def steps_per_s(batches) -> float:
        torch.manual_seed(cfg.seed)
        model = method.build_model(net)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(cfg.seed)
        for i in range(cfg.steps + 5):
            if i == 5:  # warm-up steps excluded
                t0 = time.perf_counter()
            x, c = batches.next_batch(g)
            loss = method.loss(model, x, c.float(), generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return cfg.steps / (time.perf_counter() - t0)

    rss0 = _peak_rss_mb()
    with StoreStream(path, cfg.batch, seed=cfg.seed) as stream:
        stream_rate = steps_per_s(stream)
    stream_peak = stream.peak_bytes
    rss_stream = _peak_rss_mb()
    data = read_store(path)
    x = latlon_to_xyz(torch.as_tensor(data.latlon)).float()
    bare_rate = steps_per_s(TensorBatches(x, torch.as_tensor(data.embeddings), cfg.batch))
    store_mb = cfg.rows * (cfg.dim * 2 + 16) / 2**20
    return {"rows": cfg.rows, "store_mb": round(store_mb, 1), "stream_steps_per_s": round(stream_rate, 2),
            "bare_steps_per_s": round(bare_rate, 2), "ratio": round(stream_rate / bare_rate, 3),
            "stream_buffer_peak_mb": round(stream_peak / 2**20, 1), "peak_rss_mb_before": round(rss0, 1),
            "peak_rss_mb_streaming": round(rss_stream, 1), "peak_rss_mb_after_in_memory": round(_peak_rss_mb(), 1)}


def bench_dask_predict(cfg: ScaleBenchConfig) -> dict:
    """Records/s of predict in process vs on a 2-worker LocalCluster (same partitions): the cold
    run starts and stops its own cluster (``--dask local:2``); the warm one scores on a running
    cluster whose workers already imported torch and loaded the model (``--dask ADDRESS``, its
    second run). The in-process run is timed before and after the Dask ones (load drift); their
    mean is the baseline. CPU seconds (the first in-process run; the workers of the warm run) say
    what the work cost whatever else ran on the machine."""
    import shutil

    from geopipe.pipeline.core.parallel import dask_client
    from geopipe.stages.predict import PredictConfig, run_predict
    from geopipe.stages.train import TrainConfig, run_train

    store = _make_store(os.path.join(cfg.workdir, "bench-predict.zarr"), cfg.predict_rows, cfg.dim, cfg.chunk_rows, cfg.seed + 1)
    ckpt = os.path.join(cfg.workdir, "bench-model")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        run_train(TrainConfig(store=store, out=ckpt, dim=cfg.net_dim, depth=cfg.depth, steps=2, warmup=1, batch_size=256,
                              val_every=2, device="cpu", progress=False, stream=False))
    base = dict(checkpoint=ckpt, store=store, steps=cfg.predict_steps, batch_size=1024, device="cpu", progress=False)

    def timed(name: str, dask: str | None) -> float:
        target = os.path.join(cfg.workdir, f"bench-{name}")
        shutil.rmtree(target, ignore_errors=True)
        t0 = time.perf_counter()
        run_predict(PredictConfig(out=target, dask=dask, **base))
        return time.perf_counter() - t0

    c0 = time.process_time()
    first = timed("in_process", None)
    inp_cpu = time.process_time() - c0
    cold = timed("dask_local_2", "local:2")
    t0 = time.perf_counter()
    with dask_client("local:2") as client:
        start = time.perf_counter() - t0
        timed("dask_warm", client.scheduler.address)  # workers import torch and load the model
        w0 = sum(client.run(time.process_time).values())
        warm = timed("dask_warm", client.scheduler.address)
        warm_cpu = sum(client.run(time.process_time).values()) - w0
        t1 = time.perf_counter()
    start_stop = start + time.perf_counter() - t1
    second = timed("in_process", None)
    inp = (first + second) / 2
    n = cfg.predict_rows
    return {"records": n, "in_process_s": [round(first, 2), round(second, 2)], "in_process_records_per_s": round(n / inp, 1),
            "dask_local_2_s": round(cold, 2), "dask_local_2_records_per_s": round(n / cold, 1),
            "dask_running_cluster_s": round(warm, 2), "dask_running_cluster_records_per_s": round(n / warm, 1),
            "in_process_cpu_s": round(inp_cpu, 1), "dask_running_cluster_worker_cpu_s": round(warm_cpu, 1),
            "cluster_start_stop_s": round(start_stop, 2), "overhead": round(1 - inp / cold, 3),
            "overhead_running_cluster": round(1 - inp / warm, 3), "load_average_1min": round(os.getloadavg()[0], 2)}


def _clip_retrieval_folder(root: str, rows: int, dim: int, seed: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.join(root, "clip")
    if os.path.exists(os.path.join(folder, "img_emb", "img_emb_0.npy")):
        return folder
    os.makedirs(os.path.join(folder, "img_emb"), exist_ok=True)
    os.makedirs(os.path.join(folder, "metadata"), exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(os.path.join(folder, "img_emb", "img_emb_0.npy"), rng.normal(size=(rows, dim)).astype(np.float32))
    pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(rows)], "latitude": rng.uniform(-80, 80, rows),
                             "longitude": rng.uniform(-180, 180, rows), "url": [f"http://x/{i}.jpg" for i in range(rows)]}),
                   os.path.join(folder, "metadata", "metadata_0.parquet"))
    return folder


def _bare_import(folder: str, out: str, chunk_rows: int) -> float:
    """np.load + L2 normalise + float16 zarr write (same chunks/codec as a store), seconds."""
    import shutil

    import pyarrow.parquet as pq
    import zarr
    from zarr.codecs import BloscCodec

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    emb = np.load(os.path.join(folder, "img_emb", "img_emb_0.npy"))
    meta = pq.read_table(os.path.join(folder, "metadata", "metadata_0.parquet"))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    ll = np.column_stack([meta.column("latitude").to_numpy(), meta.column("longitude").to_numpy()])
    g = zarr.open_group(out, mode="w")
    codec = BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")  # as the store's float arrays
    g.create_array("embeddings", shape=emb.shape, chunks=(chunk_rows, emb.shape[1]), dtype="float16", compressors=codec)[:] = emb
    g.create_array("latlon", shape=ll.shape, chunks=(chunk_rows, 2), dtype="float64", compressors=codec)[:] = ll
    g.create_array("keys", shape=(meta.num_rows,), chunks=(chunk_rows,), dtype=str)[:] = np.asarray(meta.column("key").to_pylist(), dtype=object)
    return time.perf_counter() - t0


def _child_bare(folder: str, out: str, chunk_rows: int) -> tuple[float, float, float]:
    """In a fresh process: (seconds, peak RSS MB after imports, peak RSS MB at the end) of the bare import."""
    import pyarrow.parquet  # noqa: F401  (imports before the RSS baseline)
    import zarr  # noqa: F401

    rss0 = _hwm_mb()
    return _bare_import(folder, out, chunk_rows), rss0, _hwm_mb()


def _child_import(folder: str, store: str) -> tuple[float, float, float]:
    """In a fresh process: (seconds, peak RSS MB after imports, peak RSS MB at the end) of ``geopipe import``."""
    import pyarrow.parquet  # noqa: F401
    import zarr  # noqa: F401

    from geopipe.stages.import_embeddings import ImportConfig, run_import

    rss0 = _hwm_mb()
    t0 = time.perf_counter()
    run_import(ImportConfig(sources=(folder,), store=store, backbone_name="bench", key_col="key", progress=False))
    return time.perf_counter() - t0, rss0, _hwm_mb()


def _in_child(fn, *args):
    """``fn(*args)`` in a fresh spawned process (its own peak RSS, untouched by this one's)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def bench_import(cfg: ScaleBenchConfig) -> dict:
    """Rows/s of geopipe import vs the bare np.load + normalise + zarr write, same arrays, each in
    a fresh process so that each peak RSS is its own (growth = peak at the end − peak after imports)."""
    import shutil

    folder = _clip_retrieval_folder(cfg.workdir, cfg.import_rows, cfg.import_dim, cfg.seed)
    bare, bare_rss0, bare_rss = _in_child(_child_bare, folder, os.path.join(cfg.workdir, "bench-bare.zarr"), cfg.chunk_rows)
    store = os.path.join(cfg.workdir, "bench-import.zarr")
    shutil.rmtree(store, ignore_errors=True)
    stage, imp_rss0, imp_rss = _in_child(_child_import, folder, store)
    return {"rows": cfg.import_rows, "dim": cfg.import_dim, "input_mb": round(cfg.import_rows * cfg.import_dim * 4 / 2**20, 1),
            "bare_s": round(bare, 2), "import_s": round(stage, 2), "ratio": round(bare / stage, 3),
            "import_rows_per_s": round(cfg.import_rows / stage), "bare_peak_rss_mb": round(bare_rss, 1),
            "bare_rss_growth_mb": round(bare_rss - bare_rss0, 1), "import_peak_rss_mb": round(imp_rss, 1),
            "import_rss_growth_mb": round(imp_rss - imp_rss0, 1)}

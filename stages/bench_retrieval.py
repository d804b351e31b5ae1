"""Benchmarks of retrieval and BayesCap against bare baselines in the same run.

``bench_retrieval``: exact top-K of ``queries`` against a generated database of ``db_rows``
unit vectors stored as float16 (converted chunk by chunk, as a store is read), with the
project's blocked search, faiss (when installed) and a bare matmul + top-k loop over the same
chunks (interleaved repeats, fastest counts); queries/s, the ratio blocked / bare, agreement
of the neighbours, and the process's peak RSS. ``bench_bayescap``: training time of BayesCap(Cycle) for one pass over ``n_pairs``
pairs at batch 96, and scoring records/s with ``mc_passes`` MC-dropout passes.
``bench_retrieval_queries``: ``geopipe retrieve`` on real stores (a database of 80,689 clustered
512-d float16 records, query stores of 1K, 10K and 50K records) in a fresh process per point:
peak RSS (VmHWM) and queries/s against the number of queries, beside a bare blocked matmul +
top-k loop on the same stores measured in the same run.
"""

from __future__ import annotations

import math
import resource
import time

import numpy as np
import torch

from geopipe.pipeline.retrieval.index import faiss_available, faiss_topk
from geopipe.pipeline.retrieval.search import array_chunks, blocked_topk
from geopipe.pipeline.uncertainty.bayescap import BayesCapConfig, BayesCapMLP, BayesCapTrainConfig, train_bayescap
from geopipe.pipeline.uncertainty.mc_dropout import score_embeddings

__all__ = ["generate_database", "bench_retrieval", "bench_bayescap", "make_retrieval_stores", "bare_store_search",
           "bench_retrieval_queries"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate_database(rows: int, dim: int, seed: int = 0, chunk: int = 65536) -> np.ndarray:
    """(rows, dim) float16 unit vectors, generated chunk by chunk (bounded float32 scratch)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, dim), dtype=np.float16)
    for s in range(0, rows, chunk):
        x = rng.standard_normal((min(chunk, rows - s), dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + x.shape[0]] = x
    return out


def _bare(queries: np.ndarray, db: np.ndarray, k: int, chunk_rows: int) -> np.ndarray:
    """The baseline: float32 matmul and torch.topk per chunk, merged with another topk."""
    q = torch.from_numpy(queries)
    best_v = torch.full((q.shape[0], k), -math.inf)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64)
    for ids, emb in array_chunks(db, chunk_rows):
        s = q @ torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)).T
        v, i = torch.topk(s, min(k, s.shape[1]), dim=1)
        cv, ci = torch.cat([best_v, v], 1), torch.cat([best_i, i + int(ids[0])], 1)
        best_v, j = torch.topk(cv, k, dim=1)
        best_i = torch.gather(ci, 1, j)
    return best_i.numpy()


def _time(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def bench_retrieval(db_rows: int = 1_000_000, dim: int = 512, queries: int = 1000, k: int = 10, chunk_rows: int = 65536,
                    repeats: int = 2, seed: int = 0, threads: int | None = None) -> dict:
    """Figures of the retrieval benchmark (see the module docstring)."""
    _threads(threads)
    db = generate_database(db_rows, dim, seed)
    rng = np.random.default_rng(seed + 1)
    q = db[rng.integers(0, db_rows, queries)].astype(np.float32) + 0.05 * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    rss_db = _peak_rss_mb()
    t_bare = t_blocked = math.inf
    for _ in range(repeats):  # interleaved, so a busy machine slows both alike
        tb, bare = _time(lambda: _bare(q, db, k, chunk_rows), 1)
        tk, res = _time(lambda: blocked_topk(q, array_chunks(db, chunk_rows), k), 1)
        t_bare, t_blocked = min(t_bare, tb), min(t_blocked, tk)
    out = {"db_rows": db_rows, "dim": dim, "dtype": "float16", "queries": queries, "k": k, "chunk_rows": chunk_rows,
           "threads": torch.get_num_threads(), "bare_queries_per_s": queries / t_bare,
           "blocked_queries_per_s": queries / t_blocked, "blocked_over_bare": t_bare / t_blocked,
           "top1_agreement_blocked_bare": float((res.indices[:, 0] == bare[:, 0]).mean()),
           "database_mb": db.nbytes / 2**20, "peak_rss_mb_after_generation": rss_db, "peak_rss_mb_blocked": _peak_rss_mb()}
    if faiss_available():
        t_faiss, fres = _time(lambda: faiss_topk(q, array_chunks(db, chunk_rows), k), 1)
        out.update({"faiss_queries_per_s": queries / t_faiss, "faiss_over_bare": t_bare / t_faiss,
                    "faiss_blocked_identical": bool((fres.indices == res.indices).all()), "peak_rss_mb_faiss": _peak_rss_mb()})
    return out


def bench_bayescap(n_pairs: int = 100_000, dim: int = 512, batch: int = 96, mc_passes: int = 15, score_records: int = 10_000,
                   method: str = "bayescap-cycle", seed: int = 0, threads: int | None = None) -> dict:
    """Training seconds for one pass over ``n_pairs`` pairs and MC-dropout scoring records/s."""
    _threads(threads)
    rng = np.random.default_rng(seed)
    n = n_pairs
    a = rng.standard_normal((n, dim), dtype=np.float32)
    emb = np.concatenate([a, a + 0.1 * rng.standard_normal((n, dim), dtype=np.float32)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pairs = np.stack([np.arange(n), np.arange(n) + n], axis=1)
    torch.manual_seed(seed)
    model = BayesCapMLP(BayesCapConfig(dim))
    steps = math.ceil(n_pairs / batch)
    cfg = BayesCapTrainConfig(method=method, steps=steps, batch=batch, lr=1e-4, val_every=steps + 1, seed=seed)
    t0 = time.perf_counter()
    train_bayescap(model, emb, pairs, None, cfg)
    t_train = time.perf_counter() - t0
    x = emb[:score_records]
    t_score, _ = _time(lambda: score_embeddings(model, x, passes=mc_passes, batch=1024), 1)
    return {"n_pairs": n_pairs, "dim": dim, "batch": batch, "method": method, "steps": steps,
            "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
            "train_seconds": t_train, "train_ms_per_step": 1000 * t_train / steps,
            "mc_passes": mc_passes, "score_records_per_s": score_records / t_score}


# --- peak RSS and throughput against the number of queries (each point in a fresh process) ---

_CHILD = r"""
import importlib, json, sys, time
a = json.loads(sys.argv[1])
if a.get("threads"):
    import torch
    torch.set_num_threads(a["threads"])
if a["what"] == "bare":
    from geopipe.stages.bench_retrieval import bare_store_search
    out = bare_store_search(**a["cfg"])
else:
    mod = importlib.import_module(a.get("module") or "geopipe.stages.retrieve")
    t0 = time.perf_counter()
    res = mod.run_retrieve(mod.RetrieveConfig(**a["cfg"]))
    out = {"seconds": time.perf_counter() - t0, "recall_at_1": res.recall["recall"].get(1), "backend": res.backend}
out["peak_rss_mb"] = [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:")][0] / 1024
print(json.dumps(out))
"""


def _clustered(rng: np.random.Generator, centres: np.ndarray, places: np.ndarray, n: int, noise: float):
    """n records drawn from random clusters: centre + Gaussian noise (float32, normalised by the
    writer), the cluster's place ± ~10 m (degrees)."""
    cid = rng.integers(0, centres.shape[0], n)
    emb = centres[cid] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) * np.float32(noise / math.sqrt(centres.shape[1]))
    return emb, places[cid] + rng.normal(scale=1e-4, size=(n, 2))


def make_retrieval_stores(workdir: str, db_rows: int, queries: tuple[int, ...], dim: int = 512, clusters: int = 4000,
                          noise: float = 0.8, seed: int = 0, chunk_rows: int = 4096) -> dict:
    """A database store of ``db_rows`` and one query store per count in ``queries``, float16
    unit vectors around ``clusters`` random centres, each cluster at one place, written through
    the store writer (reused when present): {"database": path, Q: path}."""
    import os

    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    places = np.column_stack([rng.uniform(-60, 60, clusters), rng.uniform(-180, 180, clusters)])
    ident = {"name": "bench-clusters", "pretrained": None, "embed_dim": dim, "preprocess": {}, "fingerprint": f"bench-{dim}-{seed}"}
    paths = {"database": os.path.join(workdir, f"retrieval-db-{db_rows}x{dim}-s{seed}.zarr")}
    paths.update({q: os.path.join(workdir, f"retrieval-q-{q}x{dim}-s{seed}.zarr") for q in queries})
    for name, path in paths.items():
        if os.path.exists(os.path.join(path, "zarr.json")):
            continue
        n, sub = (db_rows, rng) if name == "database" else (name, np.random.default_rng([seed, name]))
        with StoreWriter.open(path, backbone=ident, embed_dim=dim, dtype="float16", chunk_rows=chunk_rows) as w:
            for s in range(0, n, 10 * chunk_rows):
                m = min(10 * chunk_rows, n - s)
                emb, ll = _clustered(sub, centres, places, m, noise)
                w.append_shard(f"{name}-{s}", emb, ll, [f"{name}-{i}" for i in range(s, s + m)], {}, [], ShardStat(m, 0.0))
    return paths


def bare_store_search(query: str, database: str, k: int, chunk_rows: int = 65536, query_block: int = 4096) -> dict:
    """The baseline of the scaling benchmark: both stores' embeddings read into memory (float16 as
    stored), then only a blocked float32 matmul + torch.topk loop, timed: {"seconds", "load_seconds"}."""
    from geopipe.pipeline.store.reader import open_store

    t0 = time.perf_counter()
    db = np.asarray(open_store(database).embeddings[:])
    q = np.asarray(open_store(query).embeddings[:], dtype=np.float32)
    t1 = time.perf_counter()
    for a in range(0, q.shape[0], query_block):
        _bare(q[a:a + query_block], db, k, chunk_rows)
    return {"seconds": time.perf_counter() - t1, "load_seconds": t1 - t0}


def _child(what: str, cfg: dict, threads: int | None, module: str | None = None, rss_limit_mb: float | None = None) -> dict:
    """Run one point in a fresh process; ``rss_limit_mb``: kill it when its RSS passes that."""
    import json
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps({"what": what, "cfg": cfg, "threads": threads, "module": module})],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as fh:
                peak = max(peak, next(int(x.split()[1]) for x in fh if x.startswith("VmRSS:")) / 1024)
        except (OSError, StopIteration):
            pass
        if rss_limit_mb and peak > rss_limit_mb:
            proc.kill()
            proc.wait()
            return {"killed_over_rss_mb": rss_limit_mb}
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return {"error": (err or out).strip().splitlines()[-1] if (err or out).strip() else f"exit {proc.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def bench_retrieval_queries(workdir: str, queries: tuple[int, ...] = (1000, 10_000, 50_000), db_rows: int = 80_689,
                            dim: int = 512, k: int = 64, modes: tuple[str, ...] = ("top1", "kernel"), threads: int | None = None,
                            module: str | None = None, rss_limit_mb: float | None = None, clusters: int = 4000, seed: int = 0) -> dict:
    """Peak RSS and queries/s of ``geopipe retrieve`` (each mode) against the number of queries,
    and a bare blocked matmul + top-k loop on the same stores, each point in a fresh process;
    ``rss_spread`` per mode: max/min − 1 of the peaks, ``over_bare``: bare time / retrieve time;
    ``module``: another implementation of RetrieveConfig/run_retrieve (e.g. an older copy, for
    before/after figures); ``rss_limit_mb``: a point whose RSS passes it is killed and says so."""
    import os

    os.makedirs(workdir, exist_ok=True)
    paths = make_retrieval_stores(workdir, db_rows, tuple(queries), dim, clusters, seed=seed)
    points = []
    for q in queries:
        point = {"queries": q, "bare": _child("bare", {"query": paths[q], "database": paths["database"], "k": k}, threads)}
        for mode in modes:
            cfg = {"query": paths[q], "database": paths["database"], "out": os.path.join(workdir, f"retrieval-{mode}-{q}.parquet"),
                   "k": k, "mode": mode, "progress": False}
            if os.path.exists(cfg["out"]):  # the previous run's output, replaced
                os.remove(cfg["out"])
            r = _child("retrieve", cfg, threads, module, rss_limit_mb)
            if "seconds" in r:
                r.update(queries_per_s=q / r["seconds"], over_bare=point["bare"]["seconds"] / r["seconds"])
            point[mode] = r
        point["bare"]["queries_per_s"] = q / point["bare"]["seconds"]
        points.append(point)
    spread = {m: max(p[m]["peak_rss_mb"] for p in points) / min(p[m]["peak_rss_mb"] for p in points) - 1
              for m in modes if all("peak_rss_mb" in p[m] for p in points)}
    return {"db_rows": db_rows, "dim": dim, "dtype": "float16", "k": k, "threads": threads, "points": points, "rss_spread": spread}

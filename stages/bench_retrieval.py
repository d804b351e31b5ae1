"""Benchmarks of retrieval and BayesCap against bare baselines in the same run.

``bench_retrieval``: exact top-K of ``queries`` against a generated database of ``db_rows``
unit vectors stored as float16 (converted chunk by chunk, as a store is read), with the
project's blocked search, faiss (when installed) and a bare matmul + top-k loop over the same
chunks (interleaved repeats, fastest counts); queries/s, the ratio blocked / bare, agreement
of the neighbours, and the process's peak RSS. ``bench_bayescap``: training time of BayesCap(Cycle) for one pass over ``n_pairs``
pairs at batch 96, and scoring records/s with ``mc_passes`` MC-dropout passes.
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

__all__ = ["generate_database", "bench_retrieval", "bench_bayescap"]


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

"""One table of every method on the geoclip world (``geopipe bench --what geoclip --workdir WORLD``).

On the stores of ``geopipe demo-data WORLD --world geoclip`` (docs/geoclip_world.md), for the
test split and the held-out region, in one run:

* ``kernel (old fit)``: ``retrieve --mode kernel`` — one κ and T fitted on the database against itself;
* ``fixed kernel, tuned on val``: the hand-tuned baseline — one kernel width and weight temperature
  chosen on a grid by the validation queries' NLL, with a 1 % uniform floor;
* ``calibrated (--val-store)``: ``retrieve --mode kernel --val-store val.zarr``
  (:mod:`geopipe.pipeline.retrieval.calibrate`);
* each generative method of ``generative`` trained ``steps`` steps on train.zarr (dim × depth),
  predicted with exact NLL and 256-sample localizability (the flows: NLL of every 10th record, no
  localizability: an ODE solve each); the hybrid excludes a record's own ``place_id`` from its
  training neighbours and is calibrated on val.zarr (``train --val-store``), as the calibrated retrieval row is.

Scored by ``geopipe evaluate``; the table has GeoScore, median km, acc@25 km, NLL (nats/sr), HDR
calibration error and seconds (fit + predict of the row's method; training counted once, on
the test row). All retrieval rows use the same top-``k`` neighbours.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, write_predictions
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.methods.registry import METHODS
from geopipe.pipeline.retrieval.calibrate import PARAMETERS, CalibratedKernel, calibrated_columns, calibrated_log_density
from geopipe.pipeline.retrieval.predictor import RetrievalOptions, load_retrieval, search_block
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, haversine_km, latlon_to_xyz
from geopipe.pipeline.store.reader import open_store
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.train import TrainConfig, run_train

__all__ = ["GeoclipBenchConfig", "GeoclipBenchResult", "run_geoclip_bench", "format_rows"]

_SPLITS = ("test", "heldout")
_ODE_METHODS = ("rfm", "flow", "diffusion")
_FLOOR = 0.01
_WIDTHS_KM = tuple(float(w) for w in np.geomspace(1.0, 3000.0, 25))
_TEMPERATURES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf)


@dataclass(frozen=True)
class GeoclipBenchConfig:
    """world: folder with train/val/test/heldout.zarr; out: outputs (default WORLD/bench); k
    neighbours; generative: methods to train (empty: retrieval only), ``steps`` each at width
    ``dim`` × ``depth`` and peak learning rate ``lr`` (None: the method's default)."""

    world: str
    out: str | None = None
    k: int = 64
    kernel_samples: int = 256
    generative: tuple[str, ...] = ("vmf_mixture", "rfm", "hybrid")
    steps: int = 2000  # every model of the table at equal training compute (batch 1,024)
    dim: int = 128
    depth: int = 4
    lr: float | None = 1e-3  # the vMF default (1e-4) learnt almost nothing in 2000 steps here (median 2,733 km)
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class GeoclipBenchResult:
    """rows: one dict per (split, method) with the table's numbers; table: markdown text."""

    rows: list[dict]
    table: str
    out: str


def _stores(cfg: GeoclipBenchConfig) -> dict[str, str]:
    stores = {s: os.path.join(cfg.world, f"{s}.zarr") for s in ("train", "val", *_SPLITS)}
    missing = [p for p in stores.values() if not os.path.isdir(p)]
    if missing:
        raise GeopipeError(f"{missing[0]} not found: write the world first (geopipe demo-data {cfg.world} --world geoclip)")
    return stores


def _neighbours(p, store_path: str, rows: np.ndarray | None = None):
    """(true (V, 2), neighbour positions (V, K, 2), distances, indices, keys) of a store's records."""
    st = open_store(store_path)
    rows = np.arange(len(st)) if rows is None else rows
    top = search_block(p, st.embeddings[rows].astype(np.float32))
    nb = p.latlon[np.clip(top.indices, 0, None)]
    nb[top.indices < 0] = np.nan
    return st.latlon[rows].astype(np.float64), nb, top.distances, top.indices, [str(k) for k in st.keys[rows]]


def _fixed(width_km: float, temperature: float, n_val: int = 0, nll: float = math.nan) -> CalibratedKernel:
    """A single-width kernel with a 1 % uniform floor, as a CalibratedKernel (other parts off)."""
    t = dict.fromkeys(PARAMETERS, 0.0)
    t.update(log_kappa=2 * math.log(EARTH_RADIUS_KM / width_km), log_temperature=math.log(temperature), medium_logit=-1e3, wide_logit=-1e3,
             log_kappa_broad=0.0, broad_logit=-1e3, uniform_logit=math.log(_FLOOR / (1 - _FLOOR)))
    return CalibratedKernel(theta=tuple(t[n] for n in PARAMETERS), feature_mean=(0.0, 0.0), feature_std=(1.0, 1.0), val_nll=nll,
                            n_val=n_val, source="grid on the validation store")


def _tune_fixed(val) -> CalibratedKernel:
    """Grid (width, T) with the lowest validation NLL."""
    tl, nb, d, idx, _ = val
    x = latlon_to_xyz(torch.from_numpy(tl))[:, None]
    best = min((float(-calibrated_log_density(_fixed(w, t), x, nb, d, idx).mean()), w, t) for w in _WIDTHS_KM for t in _TEMPERATURES)
    return _fixed(best[1], best[2], n_val=len(tl), nll=best[0])


def _write_fixed(fit: CalibratedKernel, data, out: str, cfg: GeoclipBenchConfig) -> None:
    tl, nb, d, idx, keys = data
    pred, cols = calibrated_columns(fit, nb, d, idx, tl, cfg.kernel_samples, cfg.seed)
    cols.update({"key": keys, "true_lat": tl[:, 0], "true_lon": tl[:, 1], "lat": pred[:, 0], "lon": pred[:, 1],
                 "distance_km": haversine_km(pred[:, 0], pred[:, 1], tl[:, 0], tl[:, 1])})
    model = {"method": "retrieval", "space": "sphere", "mode": "fixed kernel", "k": cfg.k, "kernel": fit.summary()}
    write_predictions(predictions_table(cols, len(keys)), out, predictions_metadata({"bench": "geoclip"}, model, provenance()))


def _retrieval_rows(cfg: GeoclipBenchConfig, stores: dict, out: str) -> dict[str, list[tuple[str, str, float]]]:
    """split → [(row name, predictions path, seconds)] of the three retrieval rows."""
    files: dict[str, list] = {s: [] for s in _SPLITS}
    for name, extra in (("kernel (old fit)", {}), ("calibrated (--val-store)", {"val_store": stores["val"]})):
        for s in _SPLITS:
            path = os.path.join(out, f"{s}-{'calibrated' if extra else 'kernel'}.parquet")
            t0 = time.perf_counter()
            run_retrieve(RetrieveConfig(query=stores[s], database=stores["train"], out=path, k=cfg.k, mode="kernel",
                                        kernel_samples=cfg.kernel_samples, seed=cfg.seed, progress=cfg.progress, overwrite=True,
                                        **extra))
            files[s].append((name, path, time.perf_counter() - t0))
    t0 = time.perf_counter()
    p = load_retrieval(open_store(stores["train"]), RetrievalOptions(k=cfg.k, mode="top1", seed=cfg.seed), "ip")
    fit = _tune_fixed(_neighbours(p, stores["val"]))
    tuned = time.perf_counter() - t0
    for s in _SPLITS:
        path, t1 = os.path.join(out, f"{s}-fixed.parquet"), time.perf_counter()
        _write_fixed(fit, _neighbours(p, stores[s]), path, cfg)
        files[s].insert(1, (f"fixed kernel {fit.width_km:.3g} km + 1 % floor, tuned on val", path, tuned + time.perf_counter() - t1))
    return files


def _generative_rows(cfg: GeoclipBenchConfig, stores: dict, out: str, files: dict) -> None:
    for method in cfg.generative:
        ckpt, t0 = os.path.join(out, f"model-{method}"), time.perf_counter()
        # the hybrid: its own places excluded, its default depth (2), its widths and weights calibrated on val
        own = {"place_field": "place_id", "depth": None, "val_store": stores["val"]} if method == "hybrid" else {}
        run_train(TrainConfig(store=stores["train"], out=ckpt, method=method, dim=cfg.dim, steps=cfg.steps, lr=cfg.lr,
                              warmup=min(500, cfg.steps // 10), val_every=cfg.steps, resume=False, progress=cfg.progress,
                              **{"depth": cfg.depth, **own}))
        trained = time.perf_counter() - t0
        # flows: an ODE per likelihood, so NLL on every 10th record and no localizability (no HDR calibration)
        ode = {"likelihood_every": 10, "localizability": 0} if method in _ODE_METHODS else {"localizability": 256}
        for s in _SPLITS:
            path, t1 = os.path.join(out, f"{s}-{method}.parquet"), time.perf_counter()
            run_predict(PredictConfig(checkpoint=ckpt, store=stores[s], out=path, nll=True, overwrite=True, progress=cfg.progress, **ode))
            depth = own.get("depth", cfg.depth) or METHODS[method].TRAIN_DEFAULTS["depth"]
            label = f"{method} {cfg.dim}×{depth}, {cfg.steps} steps" + ("" if cfg.lr is None else f", lr {cfg.lr:g}")
            files[s].append((label, path, time.perf_counter() - t1 + (trained if s == "test" else 0.0)))


def _row(split: str, name: str, entry: dict, seconds: float) -> dict:
    d, nll, cal = entry.get("distance") or {}, entry.get("nll") or {}, entry.get("calibration") or {}
    return {"split": split, "method": name, "n": entry.get("n"), "geoscore": d.get("geoscore"), "median_km": d.get("median_km"),
            "acc_25km": d.get("acc_25km"), "nll_nats": nll.get("nll_nats"), "hdr_cal_error": cal.get("error"), "seconds": seconds}


def format_rows(rows: list[dict]) -> str:
    """Markdown table of the bench rows."""
    f = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = ["| split | method | GeoScore | median km | acc@25 km | NLL (nats/sr) | HDR cal. error | seconds |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        acc = None if r["acc_25km"] is None else 100 * r["acc_25km"]
        lines.append(f"| {r['split']} (n={r['n']}) | {r['method']} | {f(r['geoscore'], '.0f')} | {f(r['median_km'], '.1f')} | "
                     f"{f(acc, '.1f')} % | {f(r['nll_nats'], '.2f')} | {f(r['hdr_cal_error'], '.3f')} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def run_geoclip_bench(cfg: GeoclipBenchConfig) -> GeoclipBenchResult:
    """Run every row on the test split and the held-out region, score them and format the table."""
    stores = _stores(cfg)
    out = cfg.out or os.path.join(cfg.world, "bench")
    os.makedirs(out, exist_ok=True)
    files = _retrieval_rows(cfg, stores, out)
    _generative_rows(cfg, stores, out, files)
    rows = []
    for s in _SPLITS:
        rep = run_evaluate(EvaluateConfig(predictions=tuple(p for _, p, _ in files[s]), names=tuple(n for n, _, _ in files[s])))
        rows += [_row(s, n, e, sec) for (n, _, sec), e in zip(files[s], rep.reports)]
    table = format_rows(rows)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    return GeoclipBenchResult(rows=rows, table=table, out=out)

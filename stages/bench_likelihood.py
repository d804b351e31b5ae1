"""Exact-likelihood settings against the predict default, on a trained model (``geopipe bench
--what nll-settings --checkpoint C --store S``).

For ``records`` labelled records of the store (their true locations: ``--nll``) and ``samples``
unguided model draws for each of the first records (the points ``--localizability`` scores), the
log-likelihood under each setting (ODE solver, tolerances, batch size) is compared with

* the *old default* — dopri5 at rtol = atol = 1e-5, the tight answer a faster setting must keep
  within 0.01 nats — timed first and last (its mean is the baseline: the ratio is time / that);
* a reference at rtol = atol = 1e-8 (how far the old default itself is from the exact value).

Rows: setting, seconds, function evaluations (network forward calls; one call evaluates the
field and its Jacobian for the whole batch), max and mean |Δ| nats against both, and the cost
ratio. Records are processed in batches of ``batch`` (predict scores up to 4096 at once).
"""

from __future__ import annotations

import time

import numpy as np
import torch

__all__ = ["OLD_DEFAULT", "SETTINGS", "bench_likelihood_settings", "format_likelihood_table"]

#: The setting every other is compared with: predict's default before this benchmark.
OLD_DEFAULT = ("dopri5 1e-5 (old default)", {"rtol": 1e-5, "atol": 1e-5, "method": "dopri5"})
#: (label, solver keywords of ``method.log_likelihood``, batch or None for the run's batch).
SETTINGS: tuple = (
    ("dopri5 3e-5", {"rtol": 3e-5, "atol": 3e-5, "method": "dopri5"}, None),
    ("bosh3 1e-4", {"rtol": 1e-4, "atol": 1e-4, "method": "bosh3"}, None),
    ("bosh3 rtol 1e-5 atol 1e-4 (new default)", {"rtol": 1e-5, "atol": 1e-4, "method": "bosh3"}, None),
    ("adaptive_heun 1e-4", {"rtol": 1e-4, "atol": 1e-4, "method": "adaptive_heun"}, None),
    ("rk4, 16 fixed steps", {"rtol": 1e-5, "atol": 1e-5, "method": "rk4", "options": {"step_size": 1 / 16}}, None),
)


def _points(p, store_path: str, records: int, samples: int, seed: int):
    """(truth unit vectors, their conditions), (model draws, their conditions)."""
    from geopipe.pipeline.sphere.geometry import latlon_to_xyz
    from geopipe.pipeline.store.reader import open_store

    store = open_store(store_path)
    latlon = np.asarray(store.latlon[: min(len(store), 20 * records)])
    rows = np.flatnonzero(np.isfinite(latlon).all(axis=1))[:records]
    cond = p.condition(np.asarray(store.embeddings[: len(latlon)])[rows])
    x = latlon_to_xyz(torch.as_tensor(latlon[rows], dtype=torch.float64)).float().to(p.device)
    per = max(1, records // samples)
    with torch.no_grad():
        y = p.method.sample(p.model, cond[:per], samples, steps=16, guidance=0.0, generator=torch.Generator(p.device).manual_seed(seed))
    return {"truth": (x, cond), "samples": (y.reshape(-1, 3), cond[:per].repeat_interleave(samples, dim=0))}


def _run(p, x, c, batch: int, kw: dict) -> tuple[np.ndarray, float, int]:
    calls = [0]
    forward = p.model.forward

    def counted(*a, **k):
        calls[0] += 1
        return forward(*a, **k)

    p.model.forward = counted
    try:
        t0 = time.perf_counter()
        out = torch.cat([p.method.log_likelihood(p.model, x[i:i + batch], c[i:i + batch], **kw) for i in range(0, len(x), batch)])
        if p.device.type == "cuda":
            torch.cuda.synchronize(p.device)
        return out.double().cpu().numpy(), time.perf_counter() - t0, calls[0]
    finally:
        p.model.forward = forward


def bench_likelihood_settings(checkpoint: str, store: str, *, records: int = 64, samples: int = 8, batch: int = 64,
                              settings: tuple = SETTINGS, reference: bool = True, device: str = "cpu", seed: int = 0) -> dict:
    """Run the comparison (module docstring) and return {"rows": [...], ...} (seconds, nats)."""
    from geopipe.pipeline.core.device import resolve_device
    from geopipe.pipeline.infer.predictor import load_predictor

    p = load_predictor(checkpoint, resolve_device(device))
    sets = _points(p, store, records, samples, seed)
    _run(p, *[t[:2] for t in sets["truth"]], 2, OLD_DEFAULT[1])  # warm-up: torch's forward-AD set-up is not a setting's cost
    runs = [(OLD_DEFAULT[0], OLD_DEFAULT[1], batch)]
    if reference:
        runs.append(("dopri5 1e-8 (reference)", {"rtol": 1e-8, "atol": 1e-8, "method": "dopri5"}, batch))
    runs += [(name, kw, b or batch) for name, kw, b in settings] + [(OLD_DEFAULT[0] + " again", OLD_DEFAULT[1], batch)]
    got = {what: {} for what in sets}
    for name, kw, b in runs:
        for what, (x, c) in sets.items():
            got[what][name] = _run(p, x, c, b, kw)
    rows = []
    for what, res in got.items():
        old = res[OLD_DEFAULT[0]]
        base = (old[1] + res[OLD_DEFAULT[0] + " again"][1]) / 2
        ref = res.get("dopri5 1e-8 (reference)")
        for name, (lp, sec, evals) in res.items():
            row = {"points": what, "setting": name, "n": len(lp), "seconds": round(sec, 3), "evaluations": evals,
                   "cost_vs_old": round(sec / base, 3), "max_abs_vs_old": float(np.abs(lp - old[0]).max()),
                   "mean_abs_vs_old": float(np.abs(lp - old[0]).mean())}
            if ref is not None:
                row.update(max_abs_vs_reference=float(np.abs(lp - ref[0]).max()), mean_abs_vs_reference=float(np.abs(lp - ref[0]).mean()))
            rows.append(row)
    return {"checkpoint": checkpoint, "store": store, "records": records, "samples": samples, "batch": batch,
            "torch_threads": torch.get_num_threads(), "device": str(p.device), "rows": rows}


def format_likelihood_table(result: dict) -> str:
    """The rows as a text table: points, setting, seconds, evaluations, cost vs the old default,
    max |Δ| nats vs the old default and vs the reference."""
    head = ("points", "setting", "s", "evaluations", "cost / old", "max |Δ| old", "max |Δ| 1e-8")
    body = [(r["points"], r["setting"], f"{r['seconds']:.2f}", str(r["evaluations"]), f"{r['cost_vs_old']:.2f}",
             f"{r['max_abs_vs_old']:.1e}", f"{r['max_abs_vs_reference']:.1e}" if "max_abs_vs_reference" in r else "-")
            for r in result["rows"]]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                     for cells in [head, tuple("-" * w for w in widths), *body])

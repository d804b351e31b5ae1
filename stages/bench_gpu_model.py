"""The generative model's checks of ``geopipe bench --what gpu``: streaming training, the training
loop, guided sampling and the exact likelihood, each timed on the device against its bare
baseline and compared with the CPU path on a small batch (tolerances in each row).

Networks are RFM GeoAdaLNMLPs of ``sizes.net_dim × sizes.net_depth`` with N(0, 0.02) weight
matrices (the zero-initialised output layers would make the field trivial).
"""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch

from geopipe.pipeline.methods.registry import get_method
from geopipe.pipeline.model.network import NetworkConfig
from geopipe.stages.bench_gpu_spec import GpuBenchConfig, gpu_check_row, sync

__all__ = ["check_stream", "check_train", "check_sample", "check_nll"]

#: Tolerances of the CPU comparisons.
GRAD_RTOL = 1e-3  # ‖∇_dev − ∇_cpu‖ / ‖∇_cpu‖ of one forward/backward (float32 both)
SAMPLE_MAX_RAD = 1e-4  # largest angle between device and CPU end points of 16 guided steps (≈ 0.64 km)
NLL_ATOL = 0.01  # nats: the "same answer" of the likelihood-settings measurement


def _model(cfg: GpuBenchConfig, seed: int = 0):
    s = cfg.sizes
    method = get_method("rfm")
    torch.manual_seed(seed)
    model = method.build_model(NetworkConfig(input_dim=3, dim=s.net_dim, depth=s.net_depth, cond_dim=s.cond_dim))
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    return method, model


def _unit(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _cond(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def _steps_per_s(step, steps: int, warm: int, device) -> float:
    for _ in range(warm):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - t0)


def _bare_step(method, model, batches, generator):
    """forward, backward and an AdamW step: what every training loop does at least."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        x, c = batches.next_batch(generator)
        loss = method.loss(model, x, c.float(), generator=generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _bench_store(cfg: GpuBenchConfig) -> str:
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    s = cfg.sizes
    path = os.path.join(cfg.workdir, f"gpu-stream-{s.stream_rows}x{s.cond_dim}.zarr")
    if os.path.exists(os.path.join(path, "zarr.json")):
        return path
    rng = np.random.default_rng(0)
    ident = {"name": "bench", "pretrained": None, "embed_dim": s.cond_dim, "preprocess": {}, "fingerprint": "bench-gpu"}
    shard = 16 * s.chunk_rows
    with StoreWriter.open(path, backbone=ident, embed_dim=s.cond_dim, dtype="float16", chunk_rows=s.chunk_rows) as w:
        for a in range(0, s.stream_rows, shard):
            n = min(shard, s.stream_rows - a)
            ll = np.column_stack([rng.uniform(-80, 80, n), rng.uniform(-180, 180, n)])
            w.append_shard(f"b{a}", rng.standard_normal((n, s.cond_dim), dtype=np.float32), ll, [f"r{i}" for i in range(a, a + n)],
                           {}, [], ShardStat(n, 0.0))
    return path


def check_stream(cfg: GpuBenchConfig, device) -> list:
    """Steps/s of training fed by a StoreStream (pinned host buffers, non-blocking copies) vs
    batches drawn from the whole store already on the device; the device stream must serve the
    CPU stream's batches bit for bit."""
    from geopipe.pipeline.sphere.geometry import latlon_to_xyz
    from geopipe.pipeline.store.reader import read_store
    from geopipe.pipeline.store.stream import StoreStream
    from geopipe.pipeline.train.loop import TensorBatches

    s, path = cfg.sizes, _bench_store(cfg)
    method, model = _model(cfg)
    model = model.to(device)
    g = torch.Generator(device=device).manual_seed(0)
    with StoreStream(path, s.train_batch, seed=0, device=device) as stream:
        pinned = bool(getattr(stream, "_pin", False))
        rate = _steps_per_s(_bare_step(method, model, stream, g), s.train_steps, 3, device)
    data = read_store(path)
    x = latlon_to_xyz(torch.as_tensor(data.latlon)).float().to(device)
    bare = _steps_per_s(_bare_step(method, model, TensorBatches(x, torch.as_tensor(data.embeddings).to(device), s.train_batch), g),
                        s.train_steps, 3, device)
    same = True
    with StoreStream(path, s.agree, seed=1, device=device) as a, StoreStream(path, s.agree, seed=1, device="cpu") as b:
        for _ in range(3):
            (xa, ca), (xb, cb) = a.next_batch(), b.next_batch()
            same &= torch.equal(xa.cpu(), xb) and torch.equal(ca.cpu(), cb)
    return [gpu_check_row("stream", f"training steps fed by StoreStream, batch {s.train_batch}, {s.net_dim}x{s.net_depth}",
                          unit="steps/s", measured=rate, baseline=bare, ratio=rate / bare, at_least=0.9, agreed=same,
                          agreement=f"3 batches of {s.agree} bit-identical to the CPU stream: {same}",
                          details={"pinned_memory": pinned, "rows": s.stream_rows, "store": path})]


def _loop_rate(cfg: GpuBenchConfig, method, model, batches, device) -> float:
    """Steps/s of geopipe's training loop (run_loop: LAMB, lr schedule, NaN guard, EMA, loss.item)."""
    from geopipe.pipeline.train.loop import LoopConfig, LoopJob, LoopState, run_loop
    from geopipe.pipeline.train.optim import EMA, make_optimizer

    s, warm = cfg.sizes, 5
    clip = method.TRAIN_DEFAULTS.get("grad_clip")
    opt = make_optimizer("lamb", [p for p in model.parameters() if p.requires_grad], lr=8e-4, weight_decay=0.05)
    ema, gen = EMA(model), torch.Generator(device=device).manual_seed(0)
    empty = (torch.zeros(0, 3, device=device), torch.zeros(0, s.cond_dim, device=device))

    def job(steps):
        loop = LoopConfig(steps=steps, lr=8e-4, warmup=1, grad_clip=clip, batch_size=s.train_batch, val_every=10**9, val_batches=1,
                          seed=0)
        return LoopJob(method, model, opt, ema, batches, empty, lambda c: c, loop, gen, lambda state: None, progress=False)

    run_loop(job(warm), LoopState())
    sync(device)
    t0 = time.perf_counter()
    run_loop(job(warm + s.train_steps), LoopState(step=warm))
    sync(device)
    return s.train_steps / (time.perf_counter() - t0)


def check_train(cfg: GpuBenchConfig, device) -> list:
    """Steps/s of run_loop vs a bare forward/backward/AdamW loop (same network and batches on the
    device); one forward/backward on the same inputs gives the CPU's gradients within GRAD_RTOL."""
    from geopipe.pipeline.train.loop import TensorBatches

    s = cfg.sizes
    method, model = _model(cfg)
    cpu_model = copy.deepcopy(model)
    model = model.to(device)
    n = 8 * s.train_batch
    batches = TensorBatches(_unit(n, 1).to(device), _cond(n, s.cond_dim, 2).to(device), s.train_batch)
    bare = _steps_per_s(_bare_step(method, model, batches, torch.Generator(device=device).manual_seed(0)), s.train_steps, 5, device)
    rate = _loop_rate(cfg, method, model, batches, device)
    y, gamma, c = _unit(s.agree, 3), torch.rand(s.agree, generator=torch.Generator().manual_seed(4)), _cond(s.agree, s.cond_dim, 5)
    grads = []
    for m, dev in ((cpu_model, torch.device("cpu")), (copy.deepcopy(cpu_model).to(device), device)):
        m.zero_grad(set_to_none=True)
        m(y.to(dev), gamma.to(dev), c.to(dev)).square().mean().backward()
        grads.append(torch.cat([p.grad.reshape(-1).double().cpu() for p in m.parameters() if p.grad is not None]))
    rel = float((grads[1] - grads[0]).norm() / grads[0].norm().clamp_min(1e-30))
    return [gpu_check_row("train", f"run_loop steps, {s.net_dim}x{s.net_depth}, batch {s.train_batch}", unit="steps/s",
                          measured=rate, baseline=bare, ratio=rate / bare, at_least=0.9, agreed=rel <= GRAD_RTOL,
                          agreement=f"gradient rel. diff {rel:.1e} <= {GRAD_RTOL:g}", details={"bare": "forward+backward+AdamW"})]


def _bench_config(cfg: GpuBenchConfig, device):
    from geopipe.stages.bench import BenchConfig

    s = cfg.sizes
    return BenchConfig(dim=s.net_dim, depth=s.net_depth, cond_dim=s.cond_dim, batch=s.sample_batch, steps=s.sample_steps,
                       nll_batch=s.nll_batch, repeats=s.repeats, threads=cfg.threads, device=str(device), progress=cfg.progress)


def _pair(cfg: GpuBenchConfig, device):
    """The same random model on the device and on the CPU, and ``agree`` records' conditions."""
    method, model = _model(cfg, seed=7)
    return method, model.to(device).eval(), copy.deepcopy(model).eval(), _cond(cfg.sizes.agree, cfg.sizes.cond_dim, 8)


def check_sample(cfg: GpuBenchConfig, device) -> list:
    """Guided sampling (bench_predict: records/s vs the bare loop of the same forwards); the same
    start points integrated on the device and on the CPU end within SAMPLE_MAX_RAD."""
    from geopipe.pipeline.model.guidance import guided_field
    from geopipe.pipeline.model.samplers import get_sampler
    from geopipe.stages.bench import bench_predict

    r = bench_predict(_bench_config(cfg, device))
    method, model, cpu_model, cond = _pair(cfg, device)
    spec = get_sampler(method.sampler, space=method.space, prediction=method.prediction)
    x0 = _unit(cfg.sizes.agree, 9)
    with torch.inference_mode():
        a = spec(guided_field(model, cond.to(device), 2.0), x0.to(device), method.schedule, cfg.sizes.sample_steps).cpu()
        b = spec(guided_field(cpu_model, cond, 2.0), x0, method.schedule, cfg.sizes.sample_steps)
    ang = float(torch.arccos((torch.nn.functional.normalize(a.double(), dim=-1) * torch.nn.functional.normalize(b.double(), dim=-1))
                             .sum(-1).clamp(-1, 1)).max())
    bare = cfg.sizes.sample_batch / r["bare_forward_s"]
    return [gpu_check_row("sample", f"{cfg.sizes.sample_steps}-step guided sampling, batch {cfg.sizes.sample_batch}", unit="records/s",
                          measured=r["records_per_s"], baseline=bare, ratio=r["ratio_bare_over_sample"], at_least=0.9,
                          agreed=ang <= SAMPLE_MAX_RAD, agreement=f"max angle {ang:.1e} rad <= {SAMPLE_MAX_RAD:g}",
                          details={k: r[k] for k in ("sample_s", "bare_forward_s", "ms_per_record")})]


def check_nll(cfg: GpuBenchConfig, device) -> list:
    """Exact likelihood (bench_nll at rtol = atol = 1e-5): records/s and the cost of one ODE
    evaluation in forwards (target ≤ 5); device and CPU NLLs of ``agree`` points at the predict
    defaults within NLL_ATOL nats."""
    from geopipe.pipeline.infer.predictor import PredictOptions
    from geopipe.stages.bench import bench_nll

    method, model, cpu_model, cond = _pair(cfg, device)
    opts, x = PredictOptions(), _unit(cfg.sizes.agree, 10)
    ode = {"rtol": opts.rtol, "atol": opts.atol, "method": opts.solver}
    b = method.log_likelihood(cpu_model, x, cond, **ode).double()
    a = method.log_likelihood(model, x.to(device), cond.to(device), **ode).double().cpu()
    diff = float((a - b).abs().max())  # first, so torch's one-off forward-AD set-up (seconds) is not in the timing below
    r = bench_nll(_bench_config(cfg, device))
    return [gpu_check_row("nll", f"exact NLL, batch {cfg.sizes.nll_batch}, {r['function_evals']} evaluations", unit="records/s",
                          measured=r["records_per_s"], baseline=cfg.sizes.nll_batch / r["forward_s"], ratio=r["cost_per_eval_over_forward"],
                          at_most=5.0, agreed=diff <= NLL_ATOL,
                          agreement=f"max |dNLL| {diff:.1e} nats <= {NLL_ATOL:g} ({opts.solver} {opts.rtol:g})",
                          details={"ratio_is": "cost of one evaluation in forwards", "baseline_is": "records/s of one forward",
                                   "nll_s": r["nll_s"], "function_evals": r["function_evals"]})]

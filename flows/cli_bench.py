"""``geopipe bench``: throughput against bare baselines measured in the same run.

Registered on the main group in :mod:`geopipe.flows.cli`; the benchmarks themselves live in
``geopipe.stages.bench*`` and load torch only when a benchmark runs.
"""

from __future__ import annotations

import json

import click

from geopipe.flows.cli_common import device_option, progress_enabled, user_errors

__all__ = ["bench_command"]


@click.command("bench")
@click.option("--what", type=click.Choice(["predict", "nll", "extract", "all", "retrieval", "retrieval-queries", "bayescap", "stream",
                                           "dask", "import", "extract-dask", "gpu", "nll-settings"]),
              default="all", show_default=True,
              help="Benchmark to run (all = predict, nll, extract; retrieval: 10^6 x 512 float16 database; bayescap: 10^5 pairs; "
                   "stream: training streamed from a store vs in memory; dask: predict on local:2 vs in process; import: "
                   "geopipe import vs np.load + zarr write; extract-dask: extract on local:2 vs one process; retrieval-queries: peak RSS and "
                   "queries/s of geopipe retrieve -k 64 at 1K, 10K, 50K queries against 80,689 x 512 float16 records vs a bare "
                   "matmul + top-k loop, a process per point; gpu: every CUDA path vs its bare baseline and the CPU path, at most ~8 min on one "
                   "GPU, writes --out (default WORKDIR/gpu-check.json) and a .txt table beside it; nll-settings: NLL of --nll-batch true "
                   "locations of --rows records of the --store and model draws, in batches of --nll-batch, under ODE solvers and "
                   "tolerances vs the old default dopri5 1e-5, model --checkpoint). stream/dask/import/retrieval-queries/gpu "
                   "write their inputs under --workdir.")
@click.option("--workdir", default="bench-data", show_default=True, type=click.Path(file_okay=False),
              help="Where stream/dask/import write their synthetic inputs (reused by later runs).")
@click.option("--rows", default=200_000, show_default=True, help="Store rows of the stream benchmark.")
@click.option("--dim", default=512, show_default=True, help="Width of the benchmarked network.")
@click.option("--depth", default=12, show_default=True, help="Residual blocks of the benchmarked network.")
@click.option("--batch", default=4096, show_default=True, help="Records per sampling batch.")
@click.option("--steps", default=16, show_default=True, help="Sampling steps per record.")
@click.option("--nll-batch", default=512, show_default=True, help="Records per exact-likelihood batch.")
@click.option("--repeats", default=2, show_default=True, help="Timed repeats (the fastest counts).")
@click.option("--threads", default=None, type=int, help="torch CPU threads (default: torch's choice).")
@click.option("--out", "-o", default=None, help="Write the figures as JSON.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON instead of the table of targets and verdicts.")
@click.option("--checkpoint", default=None, help="nll-settings: the trained model.")
@click.option("--store", default=None, help="nll-settings: a store of labelled records of the model's space.")
@click.option("--tiny", is_flag=True, help="gpu: toy sizes, the same code paths (the CI dry run: --what gpu --device cpu --tiny).")
@device_option
@user_errors
def bench_command(what, workdir, rows, dim, depth, batch, steps, nll_batch, repeats, threads, out, as_json, checkpoint, store, tiny,
                  device):
    """Measure throughput against bare baselines in the same run (ratios, records/s, images/s); prints one
    table row per figure with its baseline, ratio, target and verdict (--json: the raw figures)."""
    if what == "gpu":
        return _gpu(workdir, out, tiny, threads, device)
    if what == "nll-settings":
        return _nll_settings(checkpoint, store, rows, nll_batch, threads, out, device)
    from geopipe.stages.bench import BenchConfig, bench_nll, bench_predict

    cfg = BenchConfig(dim=dim, depth=depth, batch=batch, steps=steps, nll_batch=nll_batch, repeats=repeats, threads=threads, device=device,
                      progress=progress_enabled())
    results = {}
    if what in ("predict", "all"):
        results["predict"] = bench_predict(cfg)
    if what in ("nll", "all"):
        results["nll"] = bench_nll(cfg)
    if what in ("extract", "all"):
        from geopipe.stages.bench_extract import bench_extract

        results["extract"] = bench_extract(device=device)
    if what == "extract-dask":
        from geopipe.stages.bench_extract import bench_extract_dask

        results[what] = bench_extract_dask(device=device)
    if what in ("stream", "dask", "import"):
        import os

        from geopipe.stages import bench_scale as bs

        os.makedirs(workdir, exist_ok=True)
        scale = bs.ScaleBenchConfig(workdir=workdir, rows=rows)
        results[what] = {"stream": bs.bench_stream_train, "dask": bs.bench_dask_predict, "import": bs.bench_import}[what](scale)
    if what == "retrieval-queries":
        from geopipe.stages.bench_retrieval import bench_retrieval_queries

        results[what] = bench_retrieval_queries(workdir, threads=threads)
    if what in ("retrieval", "bayescap"):
        from geopipe.stages import bench_retrieval as br

        results[what] = br.bench_retrieval(threads=threads) if what == "retrieval" else br.bench_bayescap(threads=threads)
    text = json.dumps(results, indent=2, default=str)
    if out:
        with open(out, "w") as fh:
            fh.write(text)
    if as_json:
        click.echo(text)
        return
    from geopipe.stages.bench_table import format_bench_table

    click.echo(format_bench_table(results))
    if out:
        click.echo(f"figures → {out}")


def _gpu(workdir, out, tiny, threads, device):
    """``--what gpu``: the table on stdout, one line per check on stderr as it finishes; exit 1
    when a check raised or disagreed with the CPU (a missed target is a finding, not a failure)."""
    import os
    import sys

    from geopipe.stages.bench_gpu import run_gpu_bench
    from geopipe.stages.bench_gpu_spec import GpuBenchConfig, format_gpu_table

    cfg = GpuBenchConfig(device="cuda" if device == "auto" and not tiny else device, tiny=tiny, workdir=workdir,
                         out=out or os.path.join(workdir, "gpu-check.json"), threads=threads, progress=progress_enabled())
    res = run_gpu_bench(cfg, on_row=lambda r: print(f"geopipe: bench gpu: {r.check}: {r.verdict} ({r.what})", file=sys.stderr))
    click.echo(format_gpu_table(res.rows))
    click.echo(f"{len(res.rows)} rows in {res.seconds:.1f} s on {res.device} → {res.json_path}, {res.table_path}")
    if not res.ok:
        raise SystemExit(1)


def _nll_settings(checkpoint, store, records, batch, threads, out, device):
    """``--what nll-settings``: the table on stdout, the figures as JSON in --out."""
    from geopipe.pipeline.core.errors import ConfigError
    from geopipe.stages.bench_likelihood import bench_likelihood_settings, format_likelihood_table

    if not (checkpoint and store):
        raise ConfigError("bench --what nll-settings needs --checkpoint MODEL and --store STORE (labelled records of its space)")
    if threads:
        import torch

        torch.set_num_threads(threads)
    res = bench_likelihood_settings(checkpoint, store, records=records, batch=batch, device=device)
    if out:
        with open(out, "w") as fh:
            json.dump(res, fh, indent=2)
    click.echo(format_likelihood_table(res))

"""``geopipe retrieve``: place recognition by exact top-K search against a geotagged database;
and the BayesCap branch of ``geopipe train`` (uncertainty heads on frozen embeddings).

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the
command so ``geopipe --help`` stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import device_option, progress_enabled, user_errors

__all__ = ["retrieve_command", "train_bayescap_command"]


@click.command("retrieve")
@click.option("--query", required=True, help="Embedding store of the queries.")
@click.option("--database", default=None, help="Embedding store of the geotagged database (default: split --query by --split).")
@click.option("--out", "-o", required=True, help="Predictions Parquet file.")
@click.option("-k", "k", default=10, show_default=True, help="Neighbours per query.")
@click.option("--mode", type=click.Choice(["top1", "kernel"]), default="top1", show_default=True,
              help="Prediction: the top-1 position, or the densest neighbour of a vMF kernel mixture over the top-K "
                   "(also writes NLL, localizability and HDR ranks).")
@click.option("--split", "split_mode", type=click.Choice(["column", "blocks", "capture", "leave_one_out"]), default="column",
              show_default=True, help="How one store is split into queries and database (ignored with --database).")
@click.option("--split-column", default="split", show_default=True, help="Metadata field of --split column.")
@click.option("--query-value", default="test", show_default=True, help="Value of --split-column that marks queries.")
@click.option("--block-m", default=500.0, show_default=True, help="Cell size in metres of --split blocks.")
@click.option("--query-fraction", default=0.2, show_default=True, help="Fraction of cells/captures that become queries.")
@click.option("--capture-field", default="capture_id", show_default=True,
              help="Metadata field with capture ids: a query never retrieves its own capture.")
@click.option("--backend", type=click.Choice(["auto", "blocked", "faiss"]), default="auto", show_default=True,
              help="Search backend: faiss when installed (pip install 'geopipe[faiss]'; its GPU index when faiss has GPU "
                   "support and --device resolves to CUDA), else the blocked matmul.")
@click.option("--radius-m", default=25.0, show_default=True, help="Positive radius of Recall@K in metres.")
@click.option("--bayescap", "bayescap", default=None, help="BayesCap checkpoint (geopipe train --method bayescap…): "
              "write log_u, log_u_alea, log_u_epi of each query.")
@click.option("--mc-passes", default=15, show_default=True, help="MC-dropout passes of the --bayescap scores.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the split and the sampled predictions.")
@device_option
@user_errors
def retrieve_command(query, database, out, k, mode, split_mode, split_column, query_value, block_m, query_fraction,
                     capture_field, backend, radius_m, bayescap, mc_passes, seed, device):
    """Retrieve the top-K database records of each query and write a predictions table that
    `geopipe evaluate` scores like any model (plus Recall@K)."""
    from geopipe.pipeline.retrieval.split import SplitConfig
    from geopipe.stages.retrieve import RetrieveConfig, run_retrieve

    split = SplitConfig(mode=split_mode, column=split_column, query_value=query_value, block_m=block_m,
                        query_fraction=query_fraction, seed=seed, capture_field=capture_field)
    res = run_retrieve(RetrieveConfig(query=query, database=database, out=out, k=k, mode=mode, split=split, backend=backend,
                                      radius_m=radius_m, uncertainty_checkpoint=bayescap, mc_passes=mc_passes, seed=seed,
                                      progress=progress_enabled(), device=device))
    rec = res.recall
    cells = ", ".join(f"R@{kk} {v:.3f}" for kk, v in rec["recall"].items() if v is not None) or "none (no query has one)"
    click.echo(f"retrieved {res.n_queries} queries against {res.n_database} records ({res.backend}, {res.seconds:.1f}s) → {res.out}")
    click.echo(f"Recall at {rec['radius_m']:g} m (answerable queries; {rec['n_unanswerable']} without a positive dropped): {cells}")
    if res.kernel:
        click.echo(f"kernel: width {res.kernel['width_km']:.3g} km, temperature {res.kernel['temperature']:g}, "
                   f"validation NLL {res.kernel['val_nll']:.3f} nats/sr on {res.kernel['n_val']} records")


def train_bayescap_command(store, out, method, steps, batch_size, lr, val_every, seed, *, min_pairs=None,
                           no_pairs_policy=None, device="auto") -> None:
    """``geopipe train --method bayescap|bayescap-cycle``: options left at the generative
    defaults take the BayesCap stage's defaults instead (2000 steps, batch 96, lr 1e-4). The
    heads train on the CPU: --device is checked, and a CUDA one is said to be unused."""
    from click.core import ParameterSource

    from geopipe.pipeline.core.device import resolve_device
    from geopipe.stages.uncertainty import BayesCapStageConfig, run_train_bayescap

    if resolve_device(device).type != "cpu" and device != "auto":
        click.echo(f"note: {method} trains on the CPU; --device {device} is not used", err=True)

    ctx = click.get_current_context()
    given = lambda name: ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)  # noqa: E731
    chosen = {k: v for k, v in (("steps", steps), ("batch", batch_size), ("lr", lr), ("val_every", val_every), ("seed", seed))
              if given({"batch": "batch_size"}.get(k, k))}
    if min_pairs is not None:
        import dataclasses

        from geopipe.pipeline.retrieval.pairs import PairConfig

        chosen["pairs"] = dataclasses.replace(PairConfig(), min_pairs=min_pairs)
    if no_pairs_policy is not None:
        chosen["no_pairs_policy"] = no_pairs_policy
    res = run_train_bayescap(BayesCapStageConfig(store=store, out=out, method=method, progress=progress_enabled(), **chosen))
    p = res.pairs
    click.echo(f"pairs: {p['n_pairs']} ({p['kind']}; {p['n_train']} train, {p['n_val']} validation), "
               f"{p['pairable_fraction']:.1%} of {p['n_records']} records pairable")
    if res.status != "trained":
        click.echo(res.message)
        return
    last = res.history[-1] if res.history else (0, float("nan"), None)
    val = "-" if last[2] is None else f"{last[2]:.4f}"
    click.echo(f"trained {method} in {res.seconds:.1f} s, best step {res.best_step} (last train loss {last[1]:.4f}, "
               f"validation {val}) → {res.out}")

"""``geopipe retrieve``: place recognition by exact top-K search against a geotagged database.

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the
command so ``geopipe --help`` stays fast. Defaults live in ``RetrieveConfig`` and ``SplitConfig``:
options left out are not passed.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import config_option, device_option, given, progress_enabled, user_errors

__all__ = ["retrieve_command"]

_RETRIEVE = "geopipe.stages.retrieve:RetrieveConfig"
_SPLIT = "geopipe.pipeline.retrieval.split:SplitConfig"


@click.command("retrieve")
@click.option("--query", required=True, help="Embedding store of the queries.")
@click.option("--database", default=None, help="Embedding store of the geotagged database (default: split --query by --split).")
@click.option("--out", "-o", required=True, help="Predictions Parquet file.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file.")
@config_option("-k", "k", type=int, config=_RETRIEVE, help="Neighbours per query.")
@config_option("--mode", type=click.Choice(["top1", "kernel"]), config=_RETRIEVE,
               help="Prediction: the top-1 position, or the densest neighbour of a vMF kernel mixture over the top-K "
                    "(also writes NLL, localizability and HDR ranks).")
@click.option("--calibrate", is_flag=True, default=None,
              help="--mode kernel: fit the calibrated density (three per-query kernel widths, softmax weights, a broad part "
                   "and a uniform floor) on held-out queries — the --val-store, or else database records queried "
                   "leave-capture-out — instead of one kernel width fitted on the database against itself.")
@click.option("--val-store", default=None, help="--mode kernel: embedding store of held-out validation queries (same "
              "backbone as the database) the calibrated density is fitted on; implies --calibrate.")
@config_option("--split", "split_mode", type=click.Choice(["column", "blocks", "capture", "leave_one_out"]), config=_SPLIT,
               field="mode", help="How one store is split into queries and database (ignored with --database).")
@config_option("--split-column", type=str, config=_SPLIT, field="column", help="Metadata field of --split column.")
@config_option("--query-value", type=str, config=_SPLIT, help="Value of --split-column that marks queries.")
@config_option("--block-m", type=float, config=_SPLIT, help="Cell size in metres of --split blocks.")
@config_option("--query-fraction", type=float, config=_SPLIT, help="Fraction of cells/captures that become queries.")
@config_option("--capture-field", type=str, config=_SPLIT,
               help="Metadata field with capture ids: a query never retrieves its own capture.")
@config_option("--backend", type=click.Choice(["auto", "blocked", "faiss"]), config=_RETRIEVE,
               help="Search backend: faiss when installed (pip install 'geopipe-geolocation[faiss]'; its GPU index when faiss has GPU "
                    "support and --device resolves to CUDA), else the blocked matmul.")
@config_option("--radius-m", type=float, config=_RETRIEVE, help="Positive radius of Recall@K in metres.")
@config_option("--positives", type=click.Choice(["auto", "utm", "sphere"]), config=_RETRIEVE,
               help="Positives of Recall@K: utm = Euclidean UTM distance as the official VPR evaluation (stores extracted "
                    "with --labels vpr-name), sphere = haversine; auto = utm when both stores carry UTM of one zone.")
@click.option("--bayescap", "bayescap", default=None, help="BayesCap checkpoint (geopipe bayescap train): "
              "write log_u, log_u_alea, log_u_epi of each query.")
@config_option("--mc-passes", type=int, config=_RETRIEVE, help="MC-dropout passes of the --bayescap scores.")
@config_option("--seed", type=int, config=_RETRIEVE, help="Random seed of the split and the sampled predictions.")
@device_option
@user_errors
def retrieve_command(query, database, out, overwrite, k, mode, calibrate, val_store, split_mode, split_column, query_value, block_m, query_fraction,
                     capture_field, backend, radius_m, positives, bayescap, mc_passes, seed, device):
    """Retrieve the top-K database records of each query and write a predictions table that
    `geopipe evaluate` scores like any model (plus Recall@K)."""
    from geopipe.pipeline.retrieval.split import SplitConfig
    from geopipe.stages.retrieve import RetrieveConfig, run_retrieve

    split = SplitConfig(**given(mode=split_mode, column=split_column, query_value=query_value, block_m=block_m,
                                query_fraction=query_fraction, seed=seed, capture_field=capture_field))
    res = run_retrieve(RetrieveConfig(query=query, out=out, split=split, progress=progress_enabled(), device=device, **given(
        database=database, k=k, mode=mode, backend=backend, radius_m=radius_m, uncertainty_checkpoint=bayescap, mc_passes=mc_passes,
        seed=seed, calibrate=calibrate, val_store=val_store, positives=positives, overwrite=overwrite or None)))
    rec = res.recall
    cells = ", ".join(f"R@{kk} {v:.3f}" for kk, v in rec["recall"].items() if v is not None) or "none (no query has one)"
    click.echo(f"retrieved {res.n_queries} queries against {res.n_database} records ({res.backend}, {res.seconds:.1f}s) → {res.out}")
    click.echo(f"Recall at {rec['radius_m']:g} m (answerable queries; {rec['n_unanswerable']} without a positive dropped): {cells}")
    if rec.get("positives") == "utm":
        from geopipe.pipeline.eval.recall import format_vpr_recall

        click.echo(f"VPR recall: {format_vpr_recall(rec, 'utm')}")
    if res.kernel and res.kernel.get("calibrated"):
        sh = res.kernel["shares"]
        click.echo(f"calibrated density: widths {res.kernel['width_km']:.3g} / {res.kernel['medium_width_km']:.3g} / "
                   f"{res.kernel['wide_width_km']:.3g} km (shares {sh['sharp']:.2f} / {sh['medium']:.2f} / {sh['wide']:.2f}), broad "
                   f"{res.kernel['broad_width_km']:.3g} km ({sh['broad']:.2f}), "
                   f"uniform {sh['uniform']:.3f}, temperature {res.kernel['temperature']:.3g}; held-out NLL "
                   f"{res.kernel['val_nll']:.3f} nats/sr on {res.kernel['n_val']} queries ({res.kernel['source']})")
    elif res.kernel:
        click.echo(f"kernel: width {res.kernel['width_km']:.3g} km, temperature {res.kernel['temperature']:g}, "
                   f"validation NLL {res.kernel['val_nll']:.3f} nats/sr on {res.kernel['n_val']} records")

"""``geopipe`` command line: the composition root.

Every command builds a frozen stage config from its options and runs the stage (or, for
``run`` and ``demo``, the Prefect flow). Heavy imports happen inside commands so that
``geopipe --help`` stays fast. User-facing errors print one line and exit with status 1.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import config_option, device_option, given, progress_enabled, user_errors
from geopipe.pipeline.methods.names import METHOD_NAMES
from geopipe.pipeline.model.names import SAMPLER_NAMES, SCHEDULE_NAMES

__all__ = ["main", "cli"]




@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="geopipe-geolocation")
@click.option("--quiet", "-q", is_flag=True,
              help="No progress on stderr (on a terminal a bar, elsewhere one line every 10 s: done / total, rate, ETA).")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="GEOPIPE_THREADS", show_envvar=True,
              help="CPU threads for torch (default: torch's, one per core). On a shared or loaded machine 1 is often "
                   "several times faster for geopipe's small networks.")
def cli(quiet, threads):
    """geopipe — generative image geolocation on cached embedding stores.

    extract (shards → Zarr store) → train (denoiser) → predict (Parquet) → evaluate.
    """
    if threads is not None:
        from geopipe.pipeline.core.device import set_cpu_threads

        set_cpu_threads(threads)


_EXTRACT = "geopipe.stages.extract:ExtractConfig"


@cli.command()
@click.argument("shards", nargs=-1, required=True, metavar="INPUTS...")
@click.option("--store", "-o", required=True, help="Output Zarr store (created or resumed).")
@click.option("--backbone", default="tiny", show_default=True, help="open_clip model name, 'hf-hub:org/repo' or 'tiny'.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag or a local checkpoint file.")
@click.option("--batch-size", default=256, show_default=True, help="Images per backbone forward pass.")
@click.option("--workers", default=2, show_default=True, help="DataLoader decode workers.")
@click.option("--lat-key", default="latitude", show_default=True, help="json field holding the latitude in degrees.")
@click.option("--lon-key", default="longitude", show_default=True, help="json field holding the longitude in degrees.")
@click.option("--meta", "meta_fields", multiple=True, help="json fields to carry into the store (default: all scalars).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Stored embedding precision.")
@click.option("--no-normalize", is_flag=True, help="Keep raw (not L2-normalised) embeddings.")
@click.option("--max-reject-fraction", default=0.5, show_default=True, help="Fail when more than this fraction of the samples is rejected.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True, help="Autocast on CUDA.")
@click.option("--on-changed", type=click.Choice(["error", "skip", "reextract"]), default="error", show_default=True,
              help="What to do with shards changed since they were extracted.")
@click.option("--verify-hash", is_flag=True, help="Detect changed shards by sha256 instead of size/mtime.")
@click.option("--embedding-key", default=None, help="Read precomputed embeddings from this entry (e.g. street_clip.npy); no backbone runs.")
@click.option("--dask", "dask_address", default=None,
              help="'local:N' (N worker processes; one GPU each on a multi-GPU machine) or a scheduler address (tcp://host:8786): "
                   "workers embed whole shards, this process commits them in order; a cluster needs shards and store on shared storage.")
@config_option("--labels", type=click.Choice(["auto", "sidecar", "exif", "vpr-name", "none"]), config=_EXTRACT,
               help="Labels of image files: auto = the sidecar IMG.json beside IMG.jpg, else a VPR file name "
                    "(@utm_east@utm_north@zone@letter@lat@lon@pano@tile@heading@...@.jpg), else EXIF GPS, else unlabelled; "
                    "sidecar, exif or vpr-name only (vpr-name: a name that does not parse is a reject); none = never read "
                    "them (blind geolocation). Tar samples keep their json.")
@config_option("--images-per-source", type=click.IntRange(min=1), config=_EXTRACT,
               help="Most image files of a folder extracted as one source (a store record: the unit of resume and --dask).")
@config_option("--max-member-mb", type=click.IntRange(min=1), config=_EXTRACT,
               help="Largest tar member read, MiB decompressed (from its header): a bigger one makes its sample a member_too_large reject.")
@config_option("--max-image-pixels", type=click.IntRange(min=1), config=_EXTRACT,
               help="Largest image decoded (width x height, from its header): a bigger one is an image_too_large reject.")
@device_option
@user_errors
def extract(shards, store, backbone, pretrained, batch_size, workers, lat_key, lon_key, meta_fields, dtype, no_normalize, max_reject_fraction,
            precision, on_changed, verify_hash, embedding_key, device, dask_address=None, labels=None, images_per_source=None,
            max_member_mb=None, max_image_pixels=None):
    """Embed INPUTS with a frozen backbone into a Zarr store: WebDataset tars, image files (jpg, png,
    webp, tif, bmp, ...), folders of them (walked recursively), globs and brace patterns, paths or
    fsspec urls. A record's key is the file's path under its folder without the extension; photos
    added to a folder later are appended by the next run, the rest is skipped."""
    from geopipe.stages.extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        shards=tuple(shards), store=store, backbone=backbone, pretrained=pretrained, batch_size=batch_size,
        num_workers=workers, lat_key=lat_key, lon_key=lon_key, meta_fields=tuple(meta_fields) or None,
        dtype=dtype, normalize=not no_normalize, device=device, max_reject_fraction=max_reject_fraction,
        precision=precision, on_changed=on_changed, verify_hash=verify_hash, embedding_key=embedding_key, progress=progress_enabled(),
        dask=dask_address, **given(labels=labels, images_per_source=images_per_source, max_member_mb=max_member_mb,
                                   max_image_pixels=max_image_pixels),
    )
    res = run_extract(cfg)  # prints its summary (counts, rejects by reason, changed/missing shards) on stderr
    if res.all_unlabelled():  # say so before train finds nothing (blind photos to geolocate: geopipe locate)
        click.echo(f"geopipe: warning: none of the {res.n_ok} records added to {store} has a location (all unlabelled); if the "
                   f"coordinates are named otherwise, pass --lat-key/--lon-key", err=True)


_TRAIN = "geopipe.stages.train:TrainConfig"


def _method_default(key: str):
    """--help text of a training default that depends on the method: the most common value of
    the methods' TRAIN_DEFAULTS, then the exceptions, e.g. ``12 (vmf, vmf_mixture: 11)``."""

    def describe() -> str:
        from geopipe.pipeline.methods.registry import METHODS

        values = {name: cls.TRAIN_DEFAULTS[key] for name, cls in METHODS.items()}
        common = max(values.values(), key=list(values.values()).count)
        others: dict = {}
        for name, v in values.items():
            if v != common:
                others.setdefault(v, []).append(name)
        show = lambda v: "none" if v is None else f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
        exceptions = "; ".join(f"{', '.join(names)}: {show(v)}" for v, names in others.items())
        return show(common) + (f" ({exceptions})" if exceptions else "")

    return describe


@cli.command()
@click.option("--store", required=True, help="Training embedding store.")
@click.option("--out", "-o", required=True, help="Checkpoint directory.")
@config_option("--method", type=click.Choice([*METHOD_NAMES, "bayescap", "bayescap-cycle"]), config=_TRAIN,
               help="Generative method (rfm, flow, diffusion), hybrid (neighbour kernels + vMF, docs/methods.md#hybrid) or "
                    "baseline (vmf, vmf_mixture, uniform); see docs/methods.md. "
                    "bayescap, bayescap-cycle: deprecated, use `geopipe bayescap train`.")
@config_option("--dim", type=int, config=_TRAIN, help="Width of the denoiser network.")
@config_option("--depth", type=int, config=_TRAIN, describe=_method_default("depth"), help="Residual blocks of the denoiser network.")
@config_option("--location-features", type=click.Choice(["none", "rff"]), config=_TRAIN,
               help="Encoding of the denoiser's noisy point (rfm, flow, diffusion): rff adds random Fourier features at "
                    "3 scales (~1,000, 130, 16 km); see docs/methods.md#location-features.")
@config_option("--schedule", type=click.Choice(SCHEDULE_NAMES), config=_TRAIN, help="Noise schedule of the diffusion-style methods.")
@config_option("--steps", type=int, config=_TRAIN, help="Optimiser steps.")
@config_option("--batch-size", type=int, config=_TRAIN, help="Records per training step.")
@config_option("--lr", type=float, config=_TRAIN, describe=_method_default("lr"), help="Peak learning rate (reached after the warm-up).")
@config_option("--warmup", type=int, config=_TRAIN, help="Steps of linear learning-rate warm-up.")
@config_option("--weight-decay", type=float, config=_TRAIN, help="Decoupled weight decay.")
@config_option("--optimizer", type=click.Choice(["lamb", "adamw"]), config=_TRAIN, help="Optimiser.")
@config_option("--ema-decay", type=float, config=_TRAIN,
               help="Decay of the weights' moving average (the averaged model is saved and validated).")
@config_option("--val-every", type=int, config=_TRAIN, help="Validate and checkpoint every N steps.")
@config_option("--seed", type=int, config=_TRAIN, help="Random seed (initialisation, batches, noise).")
@click.option("--no-resume", is_flag=True, help="Start over even if OUT holds a training state.")
@click.option("--allow-changes", is_flag=True, help="Resume although the store or training options differ from the "
              "saved run (the differences are recorded in the checkpoint's config.json).")
@click.option("--stream/--in-memory", "stream", default=None,
              help="Stream shuffled chunks from the store through a bounded buffer, or load it whole "
                   "(default: in memory when the store fits comfortably).")
@config_option("--neighbours", type=int, config=_TRAIN, help="hybrid: gallery neighbours per record (docs/methods.md#hybrid).")
@config_option("--exclude-km", type=float, config=_TRAIN,
               help="hybrid: a training record's gallery rows within this distance (its own place) are not its neighbours.")
@config_option("--place-field", config=_TRAIN, describe=lambda: "none: places chained by --exclude-km",
               help="hybrid: a metadata field of place ids (e.g. place_id); a record's own place is never its neighbour.")
@config_option("--val-store", config=_TRAIN, describe=lambda: "none: no held-out calibration",
               help="hybrid: a held-out store (e.g. val.zarr) on which its calibration is fitted (docs/methods.md#hybrid).")
@config_option("--dropout", type=float, config=_TRAIN, describe=lambda: "0.5",
               help="hybrid: dropout on the embedding's projection in training (keeps it from memorising its training records).")
@click.option("--min-pairs", default=None, type=int, help="Deprecated with --method bayescap…: see `geopipe bayescap train`.")
@click.option("--no-pairs-policy", default=None, type=click.Choice(["skip", "identity", "relaxed_radius"]),
              help="Deprecated with --method bayescap…: see `geopipe bayescap train`.")
@device_option
@user_errors
def train(store, out, method, dim, depth, location_features, schedule, steps, batch_size, lr, warmup, weight_decay, optimizer, ema_decay,
          val_every, seed, no_resume, stream, device, allow_changes=False, min_pairs=None, no_pairs_policy=None, neighbours=None, exclude_km=None,
          place_field=None, val_store=None, dropout=None):
    """Train a generative geolocation model on a store's cached embeddings. Options left out
    take the method's defaults (docs/methods.md#training)."""
    if method in ("bayescap", "bayescap-cycle"):  # post-hoc uncertainty heads: their own command and defaults
        from geopipe.flows.cli_bayescap import train_bayescap

        click.echo(f"geopipe: `train --method {method}` is deprecated; use `geopipe bayescap train`", err=True)
        return train_bayescap(store, out, device=device, **given(
            method=method, steps=steps, batch=batch_size, lr=lr, val_every=val_every, seed=seed, min_pairs=min_pairs,
            no_pairs_policy=no_pairs_policy))
    from geopipe.stages.train import TrainConfig, run_train

    cfg = TrainConfig(store=store, out=out, device=device, stream=stream, progress=progress_enabled(), **given(
        method=method, dim=dim, depth=depth, location_features=location_features, schedule=schedule, steps=steps, batch_size=batch_size,
        lr=lr, warmup=warmup,
        weight_decay=weight_decay, optimizer=optimizer, ema_decay=ema_decay, val_every=val_every, seed=seed,
        resume=False if no_resume else None, allow_changes=allow_changes or None, neighbours=neighbours, exclude_km=exclude_km,
        place_field=place_field, val_store=val_store, dropout=dropout))
    res = run_train(cfg)
    click.echo(f"trained {res.method} to step {res.step}: train loss {res.train_loss:.4f}, val loss {res.val_loss:.4f} → {res.checkpoint}")


_PREDICT = "geopipe.stages.predict:PredictConfig"


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint directory (the --out of geopipe train).")
@click.option("--store", required=True, help="Embedding store of the records to predict.")
@click.option("--out", "-o", required=True,
              help="Predictions: one Parquet file when it ends in .parquet and --dask is not given, otherwise a Parquet "
                   "dataset directory of part files written by the workers (rerun to resume).")
@config_option("--steps", type=int, config=_PREDICT, help="Sampler steps per prediction.")
@config_option("--guidance", type=float, config=_PREDICT, help="Classifier-free guidance scale of the point prediction (0 = unguided).")
@click.option("--sampler", default=None, type=click.Choice(SAMPLER_NAMES), help="Sampler (default: the method's own).")
@config_option("--samples", type=int, config=_PREDICT, help="Extra unguided samples per record to store.")
@config_option("--ensemble", type=int, config=_PREDICT,
               help="Draw N unguided samples and keep the most likely one (0 = off; see docs/methods.md).")
@click.option("--nll", is_flag=True, help="Exact log-likelihood of the true location.")
@config_option("--localizability", type=int, config=_PREDICT, help="Monte-Carlo samples for −entropy (0 = off).")
@config_option("--rtol", type=float, config=_PREDICT, help="Relative tolerance of the likelihood ODE solver.")
@config_option("--atol", type=float, config=_PREDICT, help="Absolute tolerance of the likelihood ODE solver.")
@config_option("--solver", type=click.Choice(["dopri5", "bosh3", "adaptive_heun", "dopri8"]), config=_PREDICT,
               help="Adaptive ODE solver of the likelihoods (--nll, --localizability, --ensemble, exact --region).")
@config_option("--likelihood-every", type=int, config=_PREDICT,
               help="Compute --nll and --localizability for every K-th record only (store rows 0, K, 2K, …; the others "
                    "get null): a K-times cheaper estimate of the set's NLL, localizability and calibration.")
@config_option("--batch-size", type=int, config=_PREDICT, help="Records per sampling batch.")
@config_option("--seed", type=int, config=_PREDICT, help="Random seed of the sampling noise (per batch).")
@click.option("--dask", "dask_address", default=None,
              help="'local:N' for a LocalCluster with N workers, or a scheduler address (tcp://host:8786); workers need "
                   "the checkpoint, the store and -o on shared storage or fsspec urls.")
@click.option("--bayescap", default=None, help="BayesCap checkpoint (geopipe bayescap train) trained on embeddings "
              "of the store's backbone: also write log_u, log_u_alea, log_u_epi of each record.")
@config_option("--mc-passes", type=int, config=_PREDICT, help="MC-dropout passes of the --bayescap scores.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o file, or a dataset of other predictions (a dataset of "
              "the same predictions resumes without it).")
@click.option("--region", default=None, type=float,
              help="Probability mass q in (0, 1), e.g. 0.9: store each record's highest-density region of mass q as a polygon "
                   "(GeoParquet geometry column region, with region_mass and region_area_km2; S² methods).")
@click.option("--region-density", type=click.Choice(["auto", "exact", "kde"]), default=None,
              help="Density the region is drawn from: the model's own (exact: ≈ 1000 draws and 3–35 k log-likelihoods per record, "
                   "ODE solves for flows) or a KDE of 1000 draws (no likelihoods). [default: auto = exact for vmf/vmf_mixture, kde for flows]")
@device_option
@user_errors
def predict(checkpoint, store, out, steps, guidance, sampler, samples, ensemble, nll, localizability, rtol, atol, solver,
            likelihood_every, batch_size, seed, dask_address, bayescap, mc_passes, device, overwrite, region, region_density=None):
    """Sample location predictions (and optionally likelihoods, localizability) for a store."""
    from geopipe.stages.predict import PredictConfig, run_predict

    cfg = PredictConfig(checkpoint=checkpoint, store=store, out=out, device=device, progress=progress_enabled(), **given(
        steps=steps, guidance=guidance, sampler=sampler, samples=samples, ensemble=ensemble, nll=nll or None,
        localizability=localizability, rtol=rtol, atol=atol, solver=solver, likelihood_every=likelihood_every, batch_size=batch_size, seed=seed,
        dask=dask_address, uncertainty_checkpoint=bayescap, mc_passes=mc_passes, overwrite=overwrite or None, region=region, region_density=region_density))
    res = run_predict(cfg)
    click.echo(f"predicted {res.n_records} records in {res.seconds:.1f} s ({res.records_per_s:.0f} records/s) → {res.out}")


_EVALUATE = "geopipe.stages.evaluate:EvaluateConfig"


@cli.command()
@click.argument("predictions", nargs=-1, required=True)
@click.option("--out", "-o", default=None, help="Write the JSON report here.")
@click.option("--overwrite", is_flag=True, help="Replace an existing -o report.")
@click.option("--name", "names", multiple=True, help="Label per predictions file (repeat).")
@click.option("--baseline-store", default=None, help="Add a constant-prediction row (mean direction of this store).")
@click.option("--store", default=None,
              help="Store with true admin labels (meta/<field>) for country/region/city accuracy; the predicted "
                   "labels come from reverse geocoding the predicted points (pip install 'geopipe-geolocation[geocode]').")
@click.option("--geocode", is_flag=True, help="Country/region/city accuracy by offline reverse geocoding "
              "(pip install 'geopipe-geolocation[geocode]'); true labels from --store when given.")
@click.option("--country-field", default=None,
              help="Store meta field of the true country [default: unique_country, skipped when the store lacks it].")
@click.option("--region-field", default=None, help="Store meta field of the true region [default: unique_region, if present].")
@click.option("--city-field", default=None, help="Store meta field of the true city [default: unique_city, if present].")
@config_option("--prdc-k", type=int, config=_EVALUATE, help="Neighbours for precision/recall/density/coverage.")
@config_option("--prdc-chunks", type=int, config=_EVALUATE, help="Average PRDC over this many contiguous chunks (1 = the whole set).")
@click.option("--uncertainty", is_flag=True, help="Also print the failure-prediction table of every uncertainty score column.")
@config_option("--failure-km", type=float, config=_EVALUATE, help="With --uncertainty: a record fails when its error exceeds this.")
@click.option("--plots", "plots_dir", default=None, help="With --uncertainty: write sparsification and reliability PNGs here.")
@user_errors
def evaluate(predictions, out, overwrite, names, baseline_store, store, geocode, country_field, region_field, city_field, prdc_k, prdc_chunks,
             uncertainty, failure_km, plots_dir):
    """Score one or several prediction files; several files print one row per model."""
    from geopipe.stages.evaluate import EvaluateConfig, run_evaluate

    baseline = None
    if baseline_store:
        from geopipe.stages.evaluate import store_mean_direction

        baseline = store_mean_direction(baseline_store)
    res = run_evaluate(EvaluateConfig(predictions=tuple(predictions), **given(
        out=out, names=tuple(names) or None, baseline_latlon=baseline, store=store, geocode=geocode or None,
        country_field=country_field, region_field=region_field, city_field=city_field, prdc_k=prdc_k, prdc_chunks=prdc_chunks,
        uncertainty=uncertainty or None, failure_km=failure_km, plots_dir=plots_dir, overwrite=overwrite or None)))
    click.echo(res.table)
    if res.uncertainty_table:
        click.echo("\n" + res.uncertainty_table)
    for path in res.plots:
        click.echo(f"plot → {path}")


def _register_subcommands() -> None:
    # defined in sibling modules that import user_errors from here, hence registered last
    from geopipe.flows.cli_bayescap import bayescap_group
    from geopipe.flows.cli_bench import bench_command
    from geopipe.flows.cli_demo import demo_command, demo_data_command
    from geopipe.flows.cli_flow import run_command, serve_command
    from geopipe.flows.cli_inspect import inspect_command
    from geopipe.flows.cli_locate import locate_command
    from geopipe.flows.cli_maps import calibration_plot_command, map_command
    from geopipe.flows.cli_retrieval import retrieve_command
    from geopipe.flows.cli_store import import_command, store_group
    from geopipe.flows.cli_vpr import vpr_eval_command

    for command in (locate_command, store_group, import_command, map_command, calibration_plot_command, retrieve_command, bench_command, inspect_command,
                    demo_data_command, demo_command, bayescap_group, vpr_eval_command, run_command, serve_command):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="geopipe")


if __name__ == "__main__":  # pragma: no cover
    main()

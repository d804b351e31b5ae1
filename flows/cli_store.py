"""``geopipe store info|verify|repair`` and ``geopipe import``: store tools and precomputed embeddings.

Registered on the main group in :mod:`geopipe.flows.cli` with ``cli.add_command(store_group)`` and
``cli.add_command(import_command)``. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import sys

import click

from geopipe.flows.cli_common import progress_enabled, user_errors

__all__ = ["store_group", "import_command"]


@click.group("store")
def store_group():
    """Inspect and check embedding stores."""


@store_group.command("info")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of name: value lines.")
@user_errors
def store_info_command(store, as_json):
    """Counts, embedding format, backbone, shards, rejects and size on disk of STORE (path or fsspec url)."""
    from geopipe.stages.store_tools import StoreInfoConfig, run_store_info

    res = run_store_info(StoreInfoConfig(store=store))
    click.echo(res.to_json() if as_json else res.text)


@store_group.command("verify")
@click.argument("store")
@user_errors
def store_verify_command(store):
    """Check STORE end to end; exit status 0 when valid, 1 with the list of problems otherwise."""
    from geopipe.stages.store_tools import StoreVerifyConfig, run_store_verify

    res = run_store_verify(StoreVerifyConfig(store=store))
    click.echo(res.text, err=not res.ok)
    if not res.ok:
        sys.exit(1)


@store_group.command("repair")
@click.argument("store")
@user_errors
def store_repair_command(store):
    """Rebuild what STORE holds the makings of (rejects.parquet from its per-shard parts, the
    consolidated metadata; temporary files of killed writes go) and drop its damaged shards (found by
    `store verify`) so that running the same extract or import again writes them anew. A store's
    shards are contiguous rows: every shard after the first damaged one is dropped too."""
    from geopipe.stages.store_tools import StoreRepairConfig, run_store_repair

    res = run_store_repair(StoreRepairConfig(store=store))
    rebuilt = f"{'; '.join(res.rebuilt)}" if res.rebuilt else ""
    if not res.dropped:
        click.echo(f"{store}: {rebuilt or 'nothing to repair'}")
        return
    click.echo(f"{store}: dropped {len(res.dropped)} shard(s) from {res.dropped[0]} on ({res.rows} rows kept)"
               f"{'; ' + rebuilt if rebuilt else ''}; run the same extract/import again to write them anew")


@click.command("import")
@click.argument("sources", nargs=-1, required=True)
@click.option("--store", "-o", required=True, help="Output Zarr store (created, or appended to / resumed).")
@click.option("--backbone-name", required=True, help="Label of the model that made the embeddings, e.g. StreetCLIP.")
@click.option("--key-col", default="key", show_default=True, help="Metadata column holding the record key.")
@click.option("--lat-col", default="latitude", show_default=True, help="Metadata column holding the latitude in degrees.")
@click.option("--lon-col", default="longitude", show_default=True, help="Metadata column holding the longitude in degrees.")
@click.option("--meta", "meta_fields", multiple=True, help="Metadata columns to carry (default: every scalar column).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True, help="Stored embedding precision.")
@click.option("--no-normalize", is_flag=True, help="Keep raw (not L2-normalised) embeddings.")
@click.option("--max-reject-fraction", default=0.5, show_default=True, help="Fail when more than this fraction of the rows is rejected.")
@click.option("--on-changed", type=click.Choice(["error", "skip", "reextract"]), default="error", show_default=True,
              help="Pairs whose files changed since they were imported: fail, keep the old rows, or import them again.")
@click.option("--verify-hash", is_flag=True, help="Compare file contents (sha256) of already imported pairs, not mtimes.")
@user_errors
def import_command(sources, store, backbone_name, key_col, lat_col, lon_col, meta_fields, dtype, no_normalize,
                   max_reject_fraction, on_changed, verify_hash):
    """Import precomputed embeddings from SOURCES into a store.

    SOURCES: clip-retrieval output folders (img_emb/img_emb_<i>.npy + metadata/metadata_<i>.parquet)
    or .npy files (paths, globs, brace patterns) each with a same-named .parquet beside it.
    """
    from geopipe.stages.import_embeddings import ImportConfig, run_import

    cfg = ImportConfig(sources=tuple(sources), store=store, backbone_name=backbone_name, key_col=key_col, lat_col=lat_col,
                       lon_col=lon_col, meta_fields=tuple(meta_fields) or None, dtype=dtype, normalize=not no_normalize,
                       max_reject_fraction=max_reject_fraction, on_changed=on_changed, verify_hash=verify_hash,
                       progress=progress_enabled())
    res = run_import(cfg)  # prints its one summary line (counts, rejects by reason, pairs done, throughput) on stderr
    if res.all_unlabelled():  # say so before train finds nothing
        click.echo(f"geopipe: warning: none of the {res.n_ok} records added to {store} has a location (all unlabelled); if the "
                   f"coordinates are named otherwise, pass --lat-col/--lon-col", err=True)

"""``geopipe inspect``: what an embedding store encodes — k-means prototypes with geo-purity,
nearest-neighbour galleries and linear probes to the store's metadata.

Registered on the main group in :mod:`geopipe.flows.cli`. Heavy imports happen inside the
command so ``geopipe --help`` stays fast.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import progress_enabled, user_errors

__all__ = ["inspect_command", "probe_table"]


def _split_list(values) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def probe_table(probes: list[dict]) -> str:
    """The printed table of the linear probes: one line each, held-out score against its baseline."""
    lines = [f"{'probe':<16} {'kind':<12} {'fit':>6} {'test':>6}  held-out (train)                    baseline"]
    for p in probes:
        if p["kind"] == "categorical":
            score = f"acc {p['acc_test']:.3f} ({p['acc_train']:.3f}), {p['n_classes']} classes"
            base = f"majority {p['majority_test']:.3f}"
        else:
            score = f"R² {p['r2_test']:.3f} ({p['r2_train']:.3f})"
            if "median_error_test" in p:
                score += f", median {p['median_error_test']:.3g} {p['error_unit']}"
                base = f"constant {p['baseline_median_error']:.3g} {p['error_unit']}"
            else:
                base = "R² 0"
        lines.append(f"{p['name']:<16} {p['kind']:<12} {p['n_fit']:>6} {p['n_test']:>6}  {score:<35} {base}")
    return "\n".join(lines)


@click.command("inspect")
@click.option("--store", required=True, help="Embedding store to inspect.")
@click.option("--database", default=None, help="Store the galleries search (default: --store, never returning the probe itself).")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for prototypes.parquet, galleries.parquet, probes.json (and PNG maps with --plots).")
@click.option("--probes", "n_probes", default=16, show_default=True, help="Probe records drawn at random (seeded) when no --keys are given.")
@click.option("--keys", "--key", "keys", multiple=True, help="Probe record keys (repeat, or separate with commas).")
@click.option("-k", "--k", "k", default=8, show_default=True, help="Neighbours per gallery.")
@click.option("--clusters", default=64, show_default=True, help="Spherical k-means clusters (prototypes).")
@click.option("--iterations", "n_iter", default=20, show_default=True, help="Largest number of k-means passes over the store.")
@click.option("--probe-fields", default=None,
              help="Metadata fields to probe, separated by commas (default: every field; 'none' for the location only).")
@click.option("--no-location-probe", is_flag=True, help="Do not probe the location (lat/lon as a unit vector).")
@click.option("--direction", "directions", multiple=True,
              help="Walk each probe record along a probe direction such as biome=desert, heading_deg.sin or location.z (repeat).")
@click.option("--direction-steps", default="0.25,0.5,1", show_default=True, help="Steps t of e + t·w along each --direction.")
@click.option("--purity-radius-m", default=25.0, show_default=True, help="Main geo-purity radius in metres (km radii are added).")
@click.option("--radius-m", default=25.0, show_default=True, help="Radius in metres of the galleries' geo-consistency.")
@click.option("--block-m", default=500.0, show_default=True, help="Spatial block size in metres of the probes' held-out split (0: row by row).")
@click.option("--max-probe-records", default=100_000, show_default=True, help="Records (a seeded sample) the linear probes fit on.")
@click.option("--plots", is_flag=True, help="Also write gallery maps and a prototypes map (PNG).")
@click.option("--seed", default=0, show_default=True, help="Random seed of k-means, the probe records and the split.")
@user_errors
def inspect_command(store, database, out_dir, n_probes, keys, k, clusters, n_iter, probe_fields, no_location_probe, directions,
                    direction_steps, purity_radius_m, radius_m, block_m, max_probe_records, plots, seed):
    """Inspect what a store's embeddings encode: k-means prototypes with geo-purity, nearest-neighbour
    galleries (maps and metadata; stores keep no thumbnails) and linear probes to its metadata."""
    from geopipe.pipeline.core.errors import GeopipeError
    from geopipe.pipeline.inspection.probes import ProbeConfig
    from geopipe.stages.inspect import InspectConfig, run_inspect

    fields = None if probe_fields is None else tuple(f for f in _split_list([probe_fields]) if f.lower() != "none")
    try:
        steps = tuple(float(s) for s in _split_list([direction_steps]))
    except ValueError:
        raise GeopipeError(f"--direction-steps must be numbers separated by commas, got {direction_steps!r}") from None
    cfg = InspectConfig(store=store, out_dir=out_dir, database=database, keys=_split_list(keys), n_probes=n_probes, k=k,
                        clusters=clusters, n_iter=n_iter, probe_fields=fields, location_probe=not no_location_probe,
                        directions=_split_list(directions), direction_steps=steps, purity_radius_m=purity_radius_m, radius_m=radius_m,
                        probe_split=ProbeConfig(block_m=block_m, seed=seed), max_probe_records=max_probe_records, plots=plots,
                        seed=seed, progress=progress_enabled())
    res = run_inspect(cfg)
    km = res.kmeans
    click.echo(f"inspected {res.n_records} records (galleries in {res.n_database}) in {res.seconds:.1f} s → {res.out_dir}")
    click.echo(f"k-means: {km['clusters']} clusters of {km['min_size']}–{km['max_size']} records, {km['n_iter']} passes"
               f"{'' if km['converged'] else ' (not converged)'}, mean cosine to the centroid {km['mean_cos']:.4f}")
    cells = ", ".join(f"{r} {v['median']:.2f}" for r, v in res.purity.items() if r != "spread_km")
    click.echo(f"geo-purity (median over clusters): {cells}; median spread {res.purity['spread_km']['median']:.3g} km")
    click.echo(probe_table(res.probes))
    if res.skipped:
        click.echo("not probed: " + "; ".join(f"{n} ({why})" for n, why in res.skipped.items()))

"""``geopipe vpr-eval``: place recognition on a query store against a database store, Recall@K
as VPR papers print it and the uncertainty table (every training-free score and each BayesCap
checkpoint). Registered on the main group in :mod:`geopipe.flows.cli`; defaults live in
:class:`geopipe.stages.vpr_eval.VprEvalConfig`.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import config_option, device_option, given, progress_enabled, user_errors

__all__ = ["vpr_eval_command"]

_CONFIG = "geopipe.stages.vpr_eval:VprEvalConfig"


@click.command("vpr-eval")
@click.option("--database", required=True, help="Embedding store of the database images (e.g. extracted from images/test/database).")
@click.option("--queries", required=True, help="Embedding store of the query images (same backbone).")
@click.option("--bayescap", multiple=True, help="BayesCap checkpoint (geopipe bayescap train) whose log_u scores join the "
              "table; repeat for BayesCap and BayesCapCycle.")
@click.option("--out", "-o", default=None, help="Folder for report.json, table.txt and the sparsification/reliability plots.")
@config_option("-k", "k", type=int, config=_CONFIG, help="Neighbours per query (Recall@1/5/10/20 needs 20).")
@config_option("--positives", type=click.Choice(["auto", "utm", "sphere"]), config=_CONFIG,
               help="utm = Euclidean UTM distance as the official VPR evaluation; auto = utm when both stores carry UTM of one zone.")
@config_option("--radius-m", type=float, config=_CONFIG, help="Positive radius in metres.")
@config_option("--mc-passes", type=int, config=_CONFIG, help="MC-dropout passes of the BayesCap scores.")
@config_option("--backend", type=click.Choice(["auto", "blocked", "faiss"]), config=_CONFIG, help="Search backend.")
@config_option("--seed", type=int, config=_CONFIG, help="Random seed of the MC-dropout passes.")
@device_option
@user_errors
def vpr_eval_command(database, queries, bayescap, out, k, positives, radius_m, mc_passes, backend, seed, device):
    """Retrieve every query of QUERIES in DATABASE and print Recall@K and how well each uncertainty
    score predicts a wrong top-1 (AUSC, AUSE, AURG, Spearman, R², AUROC, AUPRC)."""
    from geopipe.stages.vpr_eval import VprEvalConfig, run_vpr_eval

    res = run_vpr_eval(VprEvalConfig(database=database, queries=queries, bayescap=tuple(bayescap), out=out, device=device,
                                     progress=progress_enabled(), **given(k=k, positives=positives, radius_m=radius_m,
                                                                          mc_passes=mc_passes, backend=backend, seed=seed)))
    click.echo(f"{res.n_queries} queries against {res.n_database} database images ({res.seconds:.1f}s)")
    click.echo(res.table)
    if res.files:
        click.echo(f"wrote {', '.join(res.files)}")

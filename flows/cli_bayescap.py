"""``geopipe bayescap train``: BayesCap uncertainty heads on a store's frozen embeddings.

Registered on the main group in :mod:`geopipe.flows.cli`. Every default lives in
:class:`geopipe.stages.uncertainty.BayesCapStageConfig` (and the pair-mining ``PairConfig``):
options left out are not passed, and ``--help`` reads the defaults from there.
"""

from __future__ import annotations

import click

from geopipe.flows.cli_common import config_option, device_option, given, progress_enabled, user_errors

__all__ = ["BAYESCAP_METHODS", "bayescap_group", "train_bayescap"]

#: Uncertainty methods (the registry is geopipe.pipeline.uncertainty.bayescap.BAYESCAP_METHODS; a test keeps them equal).
BAYESCAP_METHODS = ("bayescap", "bayescap-cycle")
_CONFIG = "geopipe.stages.uncertainty:BayesCapStageConfig"
_PAIRS = "geopipe.pipeline.retrieval.viewpoints:PairConfig"


@click.group("bayescap")
def bayescap_group():
    """Post-hoc uncertainty heads (BayesCap, BayesCapCycle) on frozen embeddings; score with
    `geopipe retrieve --bayescap` or `geopipe predict --bayescap`."""


@bayescap_group.command("train")
@click.option("--store", required=True, help="Embedding store whose viewpoint pairs train the heads.")
@click.option("--out", "-o", required=True, help="Checkpoint directory (replaced when it holds BayesCap heads).")
@config_option("--method", type=click.Choice(BAYESCAP_METHODS), config=_CONFIG,
               help="BayesCap (one direction per pair) or BayesCapCycle; see docs/retrieval_uncertainty.md.")
@config_option("--steps", type=int, config=_CONFIG, help="Optimiser steps.")
@config_option("--batch-size", type=int, config=_CONFIG, field="batch", help="Pairs per training step.")
@config_option("--lr", type=float, config=_CONFIG, help="Learning rate (Adam, constant).")
@config_option("--val-every", type=int, config=_CONFIG, help="Validate (and keep the best weights) every N steps.")
@config_option("--seed", type=int, config=_CONFIG, help="Random seed (initialisation, batches, identity pairs).")
@config_option("--min-pairs", type=int, config=_PAIRS, help="Fewest viewpoint pairs to train on (given: also lifts the floor of "
               "5 percent of the records pairable). Stores without headings widen to place pairs (1-25 km) before giving up.")
@config_option("--no-pairs-policy", type=click.Choice(["skip", "identity", "relaxed_radius"]), config=_CONFIG,
               help="What to do with too few pairs (skip: train nothing and say why).")
@config_option("--pair-rule", type=click.Choice(["auto", "viewpoint", "cosplace_classes"]), config=_CONFIG,
               help="Pairs: geo viewpoint pairs, or CosPlace classes (UTM 10 m cell x 30 deg heading, other captures); auto = "
                    "classes when the store has UTM positions and headings (extract --labels vpr-name).")
@device_option
@user_errors
def bayescap_train_command(store, out, method, steps, batch_size, lr, val_every, seed, min_pairs, no_pairs_policy, pair_rule, device):
    """Mine viewpoint pairs on STORE's records (not its test split) and train uncertainty heads on their embeddings."""
    train_bayescap(store, out, device=device, **given(method=method, steps=steps, batch=batch_size, lr=lr, val_every=val_every,
                                                      seed=seed, min_pairs=min_pairs, no_pairs_policy=no_pairs_policy,
                                                      pair_rule=pair_rule))


def train_bayescap(store: str, out: str, *, device: str = "auto", min_pairs: int | None = None, **options) -> None:
    """Run the BayesCap stage with the ``options`` given (BayesCapStageConfig fields) and print
    its outcome. The heads train on the CPU: ``device`` is checked, and a CUDA one said unused.
    Too few pairs under the skip policy trains nothing: a GeopipeError (exit status 1), never a
    silent success without a checkpoint."""
    from geopipe.pipeline.core.device import resolve_device
    from geopipe.pipeline.core.errors import GeopipeError
    from geopipe.stages.uncertainty import BayesCapStageConfig, run_train_bayescap

    if min_pairs is not None:  # an explicit count of pairs is enough: no pairable-fraction floor on top
        from geopipe.pipeline.retrieval.viewpoints import PairConfig

        options["pairs"] = PairConfig(min_pairs=min_pairs, min_pairable_fraction=0.0)
    cfg = BayesCapStageConfig(store=store, out=out, progress=progress_enabled(), **options)
    if resolve_device(device).type != "cpu" and device != "auto":
        click.echo(f"note: {cfg.method} trains on the CPU; --device {device} is not used", err=True)
    res = run_train_bayescap(cfg)
    p = res.pairs
    click.echo(f"pairs: {p['n_pairs']} ({p['kind']}; {p['n_train']} train, {p['n_val']} validation), "
               f"{p['pairable_fraction']:.1%} of {p['n_records']} records pairable")
    if res.status != "trained":  # nothing to score with: a later `--bayescap OUT` would fail on a missing checkpoint
        from geopipe.stages.uncertainty import insufficient_hint

        why = res.message.split("; not trained")[0]
        raise GeopipeError(f"{why}; trained nothing and wrote nothing to {out} (--no-pairs-policy {cfg.no_pairs_policy}): "
                           f"{insufficient_hint(res.pairs, cfg.pairs.min_pairs)}")
    last = res.history[-1] if res.history else (0, float("nan"), None)
    val = "-" if last[2] is None else f"{last[2]:.4f}"
    click.echo(f"trained {cfg.method} in {res.seconds:.1f} s, best step {res.best_step} (last train loss {last[1]:.4f}, "
               f"validation {val}) → {res.out}")

"""geopipe bayescap train: too few pairs under the skip policy trains nothing and says so with
exit status 1 (before: exit 0, no checkpoint, and the next step failed on a missing config.json);
training shows its progress (steps, loss) on stderr."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.stages.uncertainty import BayesCapStageConfig, run_train_bayescap


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bco") / "views.zarr")
    write_synthetic_store(path, SyntheticConfig(n_places=40, views_per_place=3, dim=16, seed=4))
    return path


@pytest.mark.parametrize("argv", [["bayescap", "train"], ["train", "--method", "bayescap-cycle"]])
def test_too_few_pairs_exits_non_zero_and_writes_nothing(store, tmp_path, argv):
    out = tmp_path / "bc"
    r = CliRunner().invoke(cli, [*argv, "--store", store, "-o", str(out), "--steps", "5"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("geopipe: error:")]
    assert len(errors) == 1 and "insufficient_pairs" in errors[0] and f"wrote nothing to {out}" in errors[0], r.stderr
    assert "--no-pairs-policy identity" in errors[0] and not os.path.exists(out)


def test_identity_policy_still_trains_and_exits_zero(store, tmp_path):
    r = CliRunner().invoke(cli, ["bayescap", "train", "--store", store, "-o", str(tmp_path / "bc"), "--steps", "4",
                                 "--val-every", "2", "--no-pairs-policy", "identity"])
    assert r.exit_code == 0, r.output
    assert "trained bayescap" in r.output and os.path.exists(tmp_path / "bc" / "config.json")


def test_training_shows_progress(store, tmp_path, capsys):
    res = run_train_bayescap(BayesCapStageConfig(store=store, out=str(tmp_path / "bc"), steps=12, val_every=4,
                                                 no_pairs_policy="identity", progress=True))
    assert res.status == "trained"
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("bayescap train (bayescap-cycle): 12/12 step") and "loss=" in err[-1] and "val=" in err[-1]
    run_train_bayescap(BayesCapStageConfig(store=store, out=str(tmp_path / "bc2"), steps=4, val_every=2,
                                           no_pairs_policy="identity", progress=False))
    assert "bayescap train" not in capsys.readouterr().err

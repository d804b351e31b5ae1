"""BayesCap end to end on a synthetic store whose view noise grows with a per-place difficulty:
train (CPU, seconds), score through retrieve, rank failures better than random; the
insufficient-pairs policies; mismatched checkpoints."""

import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.split import SplitConfig
from geopipe.pipeline.retrieval.viewpoints import PairConfig
from geopipe.pipeline.uncertainty.scoring import score_rows
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.uncertainty import BayesCapStageConfig, run_train_bayescap

SYN = SyntheticConfig(n_places=300, views_per_place=5, dim=32, seed=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("bc")
    store = str(d / "views.zarr")
    views = write_synthetic_store(store, SYN)
    return d, store, views


@pytest.fixture(scope="module")
def trained(world):
    d, store, _ = world
    t0 = time.perf_counter()
    res = run_train_bayescap(BayesCapStageConfig(store=store, out=str(d / "bc"), method="bayescap-cycle", steps=600,
                                                 lr=3e-3, val_every=200, pairs=PairConfig(min_pairs=200)))
    return res, time.perf_counter() - t0


def test_trains_quickly_and_scores_track_difficulty(world, trained):
    d, store, views = world
    res, seconds = trained
    assert res.status == "trained" and seconds < 60
    assert res.pairs["n_train"] > 500 and res.pairs["headings"]
    from geopipe.pipeline.store.reader import open_store

    s = score_rows(res.out, open_store(store), np.arange(views["place"].size), passes=15)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(s["log_u"]), rank(views["difficulty"]))[0, 1] > 0.3
    # the epistemic part may be exactly 0 (log −inf) where every unit after the dropout is inactive
    assert np.isfinite(s["log_u"]).all() and (s["log_u"] >= s["log_u_alea"] - 1e-12).all()
    assert not np.isnan(s["log_u_epi"]).any()


def test_retrieve_with_bayescap_and_failure_table(world, trained, tmp_path):
    d, store, _ = world
    out = str(tmp_path / "r.parquet")
    run_retrieve(RetrieveConfig(query=store, out=out, k=5, split=SplitConfig(mode="capture", query_fraction=0.3),
                                uncertainty_checkpoint=trained[0].out, mc_passes=15))
    t = pq.read_table(out, columns=["log_u", "log_u_alea", "log_u_epi"]).to_pydict()
    assert all(np.isfinite(t["log_u"]))
    ev = run_evaluate(EvaluateConfig(predictions=(out,), uncertainty=True))
    row = next(r for r in ev.uncertainty if r["score"] == "log_u" and r["failure"].startswith("correct@1"))
    assert row["ausc"] > row["ausc_random"] and row["auroc"] > 0.55


def test_insufficient_pairs_policies(world, tmp_path):
    d, store, _ = world
    skip = run_train_bayescap(BayesCapStageConfig(store=store, out=str(tmp_path / "skip"), steps=10))
    assert skip.status == "insufficient_pairs" and skip.out is None and "training-free" in skip.message
    ident = run_train_bayescap(BayesCapStageConfig(store=store, out=str(tmp_path / "ident"), steps=20, val_every=10,
                                                   no_pairs_policy="identity"))
    assert ident.status == "trained" and ident.pairs["kind"].startswith("identity")
    r = CliRunner().invoke(cli, ["train", "--method", "bayescap", "--store", store, "-o", str(tmp_path / "cli"), "--steps", "5"])
    assert r.exit_code == 1, r.output  # trained nothing: no checkpoint a later --bayescap could read
    assert "insufficient_pairs" in r.stderr and not (tmp_path / "cli").exists()
    # The same store trains from the command line once --min-pairs admits its pairs.
    r = CliRunner().invoke(cli, ["train", "--method", "bayescap", "--store", store, "-o", str(tmp_path / "cli2"), "--steps", "5",
                                 "--val-every", "5", "--min-pairs", "200"])
    assert r.exit_code == 0, r.output
    assert "trained bayescap" in r.output and (tmp_path / "cli2" / "config.json").exists()
    r = CliRunner().invoke(cli, ["train", "--method", "bayescap", "--store", store, "-o", str(tmp_path / "cli3"), "--steps", "5",
                                 "--val-every", "5", "--no-pairs-policy", "identity"])
    assert r.exit_code == 0 and "trained bayescap" in r.output, r.output


def test_checkpoint_from_another_backbone_is_refused(world, trained, tmp_path):
    other = str(tmp_path / "other.zarr")
    write_synthetic_store(other, SyntheticConfig(n_places=5, views_per_place=2, dim=32), label="another-model")
    with pytest.raises(GeopipeError, match="another-model"):
        run_retrieve(RetrieveConfig(query=other, database=other, out=str(tmp_path / "x.parquet"), k=2,
                                    uncertainty_checkpoint=trained[0].out))

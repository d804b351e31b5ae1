"""geopipe predict --bayescap: BayesCap scores (log_u, log_u_alea, log_u_epi) as columns of the
generative predictions, in a file and in a Dask dataset directory; evaluate --uncertainty reads
score columns from a dataset directory as from a single file."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.dataset import finish_dataset, write_part
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.split import SplitConfig
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.train import TrainConfig, run_train
from geopipe.stages.uncertainty import BayesCapStageConfig, run_train_bayescap

U = ["log_u", "log_u_alea", "log_u_epi"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("pbc")
    store = str(d / "views.zarr")
    write_synthetic_store(store, SyntheticConfig(n_places=40, views_per_place=3, dim=16, seed=4))
    gen = str(d / "gen")
    run_train(TrainConfig(store=store, out=gen, dim=16, depth=1, expansion=2, steps=3, warmup=1, batch_size=32, val_every=3,
                          device="cpu", progress=False, stream=False))
    bc = run_train_bayescap(BayesCapStageConfig(store=store, out=str(d / "bc"), steps=20, val_every=10,
                                                no_pairs_policy="identity", progress=False))
    assert bc.status == "trained"
    return {"dir": d, "store": store, "gen": gen, "bc": bc.out}


def _predict(models, out, **kw):
    return run_predict(PredictConfig(checkpoint=models["gen"], store=models["store"], out=str(out), steps=2, batch_size=16,
                                     device="cpu", progress=False, uncertainty_checkpoint=models["bc"], mc_passes=4, **kw))


def _failure(path):
    rows = run_evaluate(EvaluateConfig(predictions=(str(path),), names=("m",), uncertainty=True, failure_km=500.0)).uncertainty
    return {(r["score"], r["failure"]): (r["n"], r["ausc"], r["auroc"]) for r in rows}


def test_predict_writes_bayescap_columns_in_file_and_dask_dataset(models, tmp_path):
    single = _predict(models, tmp_path / "p.parquet")
    dataset = _predict(models, tmp_path / "pdir", dask="local:1")
    a = pq.read_table(single.out).to_pydict()
    b = pq.read_table(dataset.out).to_pydict()
    assert len(a["key"]) == 120 and a["key"] == b["key"]
    for name in U:  # same partitions, same seeds; the epistemic part may be exactly 0 (log −inf) with few passes
        assert not np.isnan(a[name]).any() and a[name] == b[name], name
    assert np.isfinite(a["log_u"]).all() and np.isfinite(a["log_u_alea"]).all()
    assert (np.array(a["log_u"]) >= np.array(a["log_u_alea"]) - 1e-12).all()
    file_rows, dir_rows = _failure(single.out), _failure(dataset.out)
    assert ("log_u", "error <= 500 km") in file_rows and ("log_u_epi", "error <= 500 km") in file_rows
    assert dir_rows == file_rows  # the dataset directory is read like the file


def test_cli_predict_bayescap_and_evaluate(models, tmp_path):
    out = str(tmp_path / "cli.parquet")
    r = CliRunner().invoke(cli, ["predict", "-c", models["gen"], "--store", models["store"], "-o", out, "--steps", "2",
                                 "--bayescap", models["bc"], "--mc-passes", "3", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["evaluate", out, "--uncertainty", "--failure-km", "500"])
    assert r.exit_code == 0, r.output
    assert "log_u_alea" in r.output and "AUSC" in r.output


def test_bayescap_of_another_backbone_is_refused(models, tmp_path):
    other = str(tmp_path / "other.zarr")
    write_synthetic_store(other, SyntheticConfig(n_places=20, views_per_place=2, dim=16, seed=1), label="another-model")
    bc = run_train_bayescap(BayesCapStageConfig(store=other, out=str(tmp_path / "bc2"), steps=4, val_every=2,
                                                no_pairs_policy="identity", progress=False))
    with pytest.raises(GeopipeError, match=r"BayesCap checkpoint .* holds embeddings of backbone 'another-model' .*different embedding spaces") as err:
        run_predict(PredictConfig(checkpoint=models["gen"], store=models["store"], out=str(tmp_path / "x.parquet"), steps=2,
                                  device="cpu", progress=False, uncertainty_checkpoint=bc.out))
    assert "\n" not in str(err.value) and not (tmp_path / "x.parquet").exists()


def test_evaluate_reads_retrieval_columns_of_a_dataset_directory(models, tmp_path):
    """A retrieval table split into a Parquet dataset scores exactly as the file: Recall@K from the
    top-K columns and every uncertainty score column."""
    single = str(tmp_path / "r.parquet")
    run_retrieve(RetrieveConfig(query=models["store"], out=single, k=4, split=SplitConfig(mode="capture", query_fraction=0.3),
                                uncertainty_checkpoint=models["bc"], mc_passes=3))
    table = pq.read_table(single)
    meta = table.schema.metadata
    dataset, bounds = str(tmp_path / "rdir"), [(0, 10), (10, table.num_rows)]
    parts = [write_part(table.slice(s, e - s), dataset, s, e, meta) for s, e in bounds]
    finish_dataset(dataset, parts, meta)
    ev_file = run_evaluate(EvaluateConfig(predictions=(single,), names=("r",), uncertainty=True))
    ev_dir = run_evaluate(EvaluateConfig(predictions=(dataset,), names=("r",), uncertainty=True))
    assert ev_dir.reports[0]["retrieval"] == ev_file.reports[0]["retrieval"] is not None
    scores = {r["score"] for r in ev_dir.uncertainty}
    assert {"log_u", "u_dist1", "u_spread_km"} <= scores
    assert [(r["score"], r["failure"], r["ausc"]) for r in ev_dir.uncertainty] == \
           [(r["score"], r["failure"], r["ausc"]) for r in ev_file.uncertainty]

"""geopipe retrieve on a synthetic multi-view store: splits, kernel mode, degenerate inputs,
and the CLI (one clear error line each)."""

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.predictions import read_predictions
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.split import SplitConfig
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve

CFG = SyntheticConfig(n_places=120, views_per_place=4, dim=16, seed=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("syn") / "views.zarr")
    return path, write_synthetic_store(path, CFG)


def test_column_split_top1(store, tmp_path):
    path, views = store
    out = str(tmp_path / "r.parquet")
    res = run_retrieve(RetrieveConfig(query=path, out=out, k=5, chunk_rows=4096))
    t = pq.read_table(out)
    n_test = int((views["split"] == "test").sum())
    assert res.n_queries == t.num_rows == n_test and res.n_database == views["split"].size - n_test
    # test places are held out entirely: no query has a positive, all are dropped
    assert res.recall["n_unanswerable"] == n_test and res.recall["recall"][1] is None
    assert t.column("topk_keys").to_pylist()[0] and len(t.column("topk_keys")[0]) == 5
    cols, meta = read_predictions(out)
    assert meta["model"]["method"] == "retrieval" and np.isfinite(cols["lat"]).all()


def test_leave_one_out_never_retrieves_itself_and_kernel_density(store, tmp_path):
    path, views = store
    out = str(tmp_path / "loo.parquet")
    res = run_retrieve(RetrieveConfig(query=path, out=out, k=4, mode="kernel", split=SplitConfig(mode="leave_one_out"),
                                      kernel_val=200, kernel_samples=32))
    t = pq.read_table(out).to_pydict()
    assert all(key not in nbs for key, nbs in zip(t["key"], t["topk_keys"]))
    assert res.recall["n_unanswerable"] == 0 and res.recall["recall"][4] > res.recall["recall"][1] > 0.3
    assert all(np.isfinite(t["log_likelihood"])) and all(0 <= r <= 1 for r in t["hdr_rank"])
    assert res.kernel["width_km"] < 50
    # easy places are retrieved correctly more often: u_dist1 separates them
    d1 = np.array(t["u_dist1"])
    assert d1.min() >= 0 and np.corrcoef(d1, views["difficulty"])[0, 1] > 0.3


def test_two_stores_and_degenerate_inputs(store, tmp_path):
    path, _ = store
    other = str(tmp_path / "other.zarr")
    write_synthetic_store(other, SyntheticConfig(n_places=10, views_per_place=2, dim=8))
    with pytest.raises(GeopipeError, match="8-d"):
        run_retrieve(RetrieveConfig(query=path, database=other, out=str(tmp_path / "x.parquet")))
    renamed = str(tmp_path / "renamed.zarr")
    write_synthetic_store(renamed, SyntheticConfig(n_places=10, views_per_place=2, dim=16), label="another-model")
    with pytest.raises(GeopipeError, match="different backbones"):
        run_retrieve(RetrieveConfig(query=path, database=renamed, out=str(tmp_path / "x.parquet")))
    same = run_retrieve(RetrieveConfig(query=path, database=path, out=str(tmp_path / "same.parquet"), k=2))
    t = pq.read_table(str(tmp_path / "same.parquet")).to_pydict()
    assert same.n_queries == same.n_database and all(key not in nbs for key, nbs in zip(t["key"], t["topk_keys"]))
    small = str(tmp_path / "small.zarr")
    write_synthetic_store(small, SyntheticConfig(n_places=10, views_per_place=2, dim=16, seed=5))
    res = run_retrieve(RetrieveConfig(query=small, database=path, out=str(tmp_path / "ok.parquet"), k=3))
    assert res.n_queries == 20
    empty = str(tmp_path / "empty.zarr")
    ident = {"name": "synthetic", "pretrained": None, "embed_dim": 16, "preprocess": {"source": "synthetic"},
             "fingerprint": "synthetic-synthetic-16"}
    StoreWriter.open(empty, backbone=ident, embed_dim=16, dtype="float32").close()
    with pytest.raises(GeopipeError, match="has no records"):
        run_retrieve(RetrieveConfig(query=small, database=empty, out=str(tmp_path / "x.parquet")))


def test_cli_retrieve_and_errors(store, tmp_path):
    path, _ = store
    out = str(tmp_path / "cli.parquet")
    r = CliRunner().invoke(cli, ["retrieve", "--query", path, "-o", out, "-k", "3", "--split", "blocks", "--block-m", "300"])
    assert r.exit_code == 0, r.output
    assert "Recall at 25 m" in r.output
    r = CliRunner().invoke(cli, ["retrieve", "--query", path, "-o", out, "--split", "column", "--split-column", "nope", "--overwrite"])
    assert r.exit_code == 1 and "no metadata field 'nope'" in r.output

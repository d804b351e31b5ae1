"""Non-finite values in a store are named by record key before training or predicting; a NaN
truth blanks only its own row of the predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors import safe_open

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.chunks import CHUNK_DIGESTS_ATTR
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.train import TrainConfig, run_train

N, D = 96, 8


def _store(path) -> str:
    rng = np.random.default_rng(0)
    ll = np.column_stack([rng.uniform(-80, 80, N), rng.uniform(-170, 170, N)])
    with StoreWriter.open(str(path), backbone={"name": "t", "pretrained": None}, embed_dim=D, dtype="float32") as w:
        w.append_shard("a.tar", rng.normal(size=(N, D)), ll, [f"k{i:02d}" for i in range(N)], {}, [], ShardStat(1, 0.0))
    return str(path)


def _edit(path, array: str, rows, value) -> None:
    """Write ``value`` into rows of an array the way an outside tool would (no digests kept: the
    store then reads as one written before chunk digests, so only the values can tell)."""
    g = zarr.open_group(path, mode="r+")
    for r in rows:
        g[array][r] = np.full(g[array].shape[1], value)
    doc = json.loads((Path(path) / "zarr.json").read_text())
    del doc["attributes"][CHUNK_DIGESTS_ATTR]
    (Path(path) / "zarr.json").write_text(json.dumps(doc))


def _cfg(store, out, **kw):
    return TrainConfig(store=store, out=str(out), dim=16, depth=1, expansion=2, steps=4, batch_size=16, warmup=1, val_every=4,
                       device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("nan")
    run_train(_cfg(_store(root / "clean.zarr"), root / "m", stream=False))
    return str(root / "m")


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("array, value, what", [("embeddings", np.nan, "embedding has NaN (+1 more records)"),
                                                ("latlon", [np.nan, 5.0], "coordinates has NaN (+1 more records)"),
                                                ("latlon", np.inf, "coordinates has an infinite value (+1 more records)")])
def test_training_names_the_first_nonfinite_record(tmp_path, array, value, what, stream):
    """(NaN, NaN) is an unlabelled record (tests/stages/test_unlabelled.py); one NaN or an infinity is damage."""
    store = _store(tmp_path / "s.zarr")
    _edit(store, array, [7, 40], value)
    with pytest.raises(GeopipeError, match=f"store .*: record 'k07': {re.escape(what)}; the store is damaged: run `geopipe store verify"):
        run_train(_cfg(store, tmp_path / "m", stream=stream))


def test_predict_names_a_nonfinite_embedding_in_one_line(tmp_path, model):
    store = _store(tmp_path / "s.zarr")
    _edit(store, "embeddings", [3], np.inf)
    res = CliRunner().invoke(cli, ["predict", "-c", model, "--store", store, "-o", str(tmp_path / "p.parquet"), "--device", "cpu"])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"geopipe: error: store {store}: record 'k03': embedding has an infinite value; the store is damaged: "
        f"run `geopipe store verify {store}`"]


def test_a_nan_truth_blanks_only_its_own_row(tmp_path, model):  # (NaN, NaN): an unlabelled record
    store = _store(tmp_path / "s.zarr")
    bad = [2, 11, 30, 31, 77]
    _edit(store, "latlon", bad, np.nan)
    out = tmp_path / "p.parquet"
    res = CliRunner().invoke(cli, ["predict", "-c", model, "--store", store, "-o", str(out), "--device", "cpu", "--steps", "2",
                                   "--nll", "--localizability", "2", "--batch-size", "64", "--rtol", "1e-2", "--atol", "1e-2"])
    assert res.exit_code == 0, res.output
    t = pq.read_table(out).to_pydict()
    blank = [i for i in range(N) if t["true_lat"][i] is None or np.isnan(t["true_lat"][i])]
    assert blank == bad
    for col in ("distance_km", "log_likelihood", "hdr_rank"):
        values = np.array([np.nan if v is None else v for v in t[col]])
        assert np.isnan(values[bad]).all() and np.isfinite(np.delete(values, bad)).all(), col
    assert np.isfinite(np.array(t["lat"])).all()
    rep = CliRunner().invoke(cli, ["evaluate", str(out), "-o", str(tmp_path / "r.json")])
    assert rep.exit_code == 0, rep.output
    assert json.loads((tmp_path / "r.json").read_text())["reports"][0]["distance"]["n"] == N - len(bad)


@pytest.mark.parametrize("extra", [[], ["--ensemble", "2"]], ids=["point", "ensemble"])
def test_a_diverged_model_is_one_line_naming_the_record_and_what_to_do(tmp_path, model, extra):
    """NaN weights (a diverged training run) make every output non-finite: predict names the first
    record and says to retrain, in one line, rather than printing a traceback."""
    import shutil

    from safetensors.torch import load_file, save_file

    from geopipe.pipeline.artifacts.checkpoint import checkpoint_files

    bad = tmp_path / "diverged"
    shutil.copytree(model, bad)
    path = checkpoint_files(bad)["model"]
    tensors = load_file(path)
    tensors = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in tensors.items()}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(tensors, path, metadata=meta)
    res = CliRunner().invoke(cli, ["predict", "-c", str(bad), "--store", _store(tmp_path / "s.zarr"), "-o", str(tmp_path / "p.parquet"),
                                   "--device", "cpu", *extra])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert re.match(r"geopipe: error: non-finite or zero model output for record 'k00'(?: \(sample 0\))?: \[nan, nan, nan\]; .*retrain it with a lower --lr", lines[0]), lines[0]

"""End to end through the CLI (click's CliRunner): extract → train → predict → evaluate."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA
from geopipe.schemas.store import validate_store_attrs


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_cli_end_to_end(demo_world, tmp_path):
    r = CliRunner()
    train, test = str(tmp_path / "train.zarr"), str(tmp_path / "test.zarr")
    _ok(r.invoke(cli, ["extract", demo_world["train"], "--store", train, "--workers", "0", "--batch-size", "128"]))
    _ok(r.invoke(cli, ["extract", demo_world["test"], "--store", test, "--workers", "0"]))
    group = zarr.open_group(train, mode="r")
    assert validate_store_attrs(dict(group.attrs)) == []
    assert group["embeddings"].shape == (400, 64)

    ckpt = str(tmp_path / "model")
    _ok(r.invoke(cli, ["train", "--store", train, "--out", ckpt, "--dim", "32", "--depth", "2", "--steps", "20",
                       "--batch-size", "64", "--warmup", "5", "--val-every", "10", "--device", "cpu"]))
    preds = str(tmp_path / "p.parquet")
    _ok(r.invoke(cli, ["predict", "-c", ckpt, "--store", test, "-o", preds, "--steps", "4", "--nll",
                       "--localizability", "4", "--rtol", "1e-3", "--atol", "1e-3", "--device", "cpu"]))
    table = pq.read_table(preds)
    assert table.schema.remove_metadata() == PREDICTIONS_SCHEMA
    meta = json.loads(table.schema.metadata[METADATA_KEY])
    assert meta["model"]["method"]["name"] == "rfm" and meta["config"]["steps"] == 4
    df = table.to_pydict()
    assert len(df["key"]) == 80 and np.isfinite(df["log_likelihood"]).all()
    assert np.all(np.abs(df["lat"]) <= 90) and np.all(np.abs(df["lon"]) <= 180)

    report = str(tmp_path / "report.json")
    res = _ok(r.invoke(cli, ["evaluate", preds, "-o", report, "--baseline-store", train]))
    assert "GeoScore" in res.output or "geoscore" in res.output.lower()
    assert json.load(open(report))["reports"][0]["distance"]["n"] == 80


@pytest.mark.parametrize(
    "args, needle",
    [
        (["extract", "/nonexistent/shard-0000.tar", "--store", "{tmp}/s.zarr"], "not found"),
        (["extract", "{shard}", "--store", "{tmp}/s.zarr", "--backbone", "ViT-Nope-99"], "unknown backbone"),
        (["evaluate", "{tmp}/missing.parquet"], "missing.parquet"),
        (["train", "--store", "{tmp}/nostore.zarr", "--out", "{tmp}/m", "--method", "rfm"], "nostore.zarr"),
    ],
)
def test_cli_errors_are_one_line(args, needle, tmp_path, demo_world, demo_stores):
    fill = {"tmp": str(tmp_path), "shard": demo_world["test"], "store": demo_stores["test"]}
    res = CliRunner().invoke(cli, [a.format(**fill) for a in args])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.startswith("geopipe: error")]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert "Traceback" not in res.output


def test_unknown_method_is_a_usage_error_listing_the_choices(demo_stores, tmp_path):
    """--method is a choice: click refuses a typo before anything runs and lists the methods."""
    res = CliRunner().invoke(cli, ["train", "--store", demo_stores["test"], "--out", str(tmp_path / "m"), "--method", "rfn"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "'rfn' is not one of" in res.output and "'rfm'" in res.output, res.output


def test_checkpoint_embedding_dim_mismatch(demo_stores, tmp_path):
    """A checkpoint trained on 64-d embeddings refuses a store of another dimension."""
    from geopipe.stages.train import TrainConfig, run_train

    ckpt = str(tmp_path / "m")
    run_train(TrainConfig(store=demo_stores["train"], out=ckpt, dim=32, depth=1, steps=2, warmup=1, batch_size=16, val_every=2, device="cpu", progress=False))
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["embed_dim"] = 1024
    cfg_path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["predict", "-c", ckpt, "--store", demo_stores["test"], "-o", str(tmp_path / "p.parquet")])
    assert res.exit_code != 0 and "1024" in res.output and "Traceback" not in res.output

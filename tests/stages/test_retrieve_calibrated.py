"""geopipe retrieve --mode kernel --val-store / --calibrate on a small geoclip world (random location
encoder): the calibrated density is fitted on the validation store's queries, written with NLL, HDR
ranks and its parameters; beats the old kernel's NLL on the test queries; one-line errors."""

import math

import numpy as np
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.predictions import read_predictions
from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.world.geoclip import GeoclipWorldConfig
from geopipe.pipeline.world.geoclip_stores import write_geoclip_world
from geopipe.pipeline.world.location_encoder import random_location_encoder
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = np.column_stack([rng.uniform(-60, 70, 80), rng.uniform(-170, 170, 80)])
    gallery = centres[rng.integers(0, 80, 3000)] + rng.normal(size=(3000, 2)) * np.exp(rng.uniform(-6, 1, (3000, 1)))
    gallery[:, 0] = np.clip(gallery[:, 0], -89, 89)
    gallery = np.vstack([gallery, np.column_stack([rng.uniform(-46, -36, 100), rng.uniform(167, 178, 100)])])  # New Zealand
    cfg = GeoclipWorldConfig(n_train=1500, n_val=300, n_test=300, n_heldout=40, samples=8, noise=0.3, radius_max_km=1000.0)
    res = write_geoclip_world(str(tmp_path_factory.mktemp("gw")), cfg, random_location_encoder(0, dim=48), gallery, progress=False)
    return res.stores, res.out_dir


def test_calibrated_density_from_a_validation_store(world, tmp_path):
    world = world[0]
    out_old, out_cal = str(tmp_path / "old.parquet"), str(tmp_path / "cal.parquet")
    common = dict(query=world["test"], database=world["train"], k=16, mode="kernel", kernel_samples=128, progress=False)
    run_retrieve(RetrieveConfig(out=out_old, **common))
    res = run_retrieve(RetrieveConfig(out=out_cal, val_store=world["val"], **common))
    k = res.kernel
    assert k["calibrated"] and k["n_val"] == 300 and k["source"].startswith("validation store")
    assert math.isclose(sum(k["shares"].values()), 1.0) and k["width_km"] > 0
    old, _ = read_predictions(out_old)
    cal, meta = read_predictions(out_cal)
    assert meta["model"]["kernel"]["calibrated"] and meta["config"]["val_store"] == world["val"]
    assert np.isfinite(cal["log_likelihood"]).all() and ((cal["hdr_rank"] >= 0) & (cal["hdr_rank"] <= 1)).all()
    assert -cal["log_likelihood"].mean() < -old["log_likelihood"].mean() - 0.5  # held-out fit beats database-against-itself


def test_calibrate_without_validation_store_is_leave_capture_out(world, tmp_path):
    world = world[0]
    res = run_retrieve(RetrieveConfig(query=world["test"], database=world["train"], out=str(tmp_path / "c.parquet"), k=8,
                                      mode="kernel", calibrate=True, kernel_val=200, kernel_samples=32, progress=False))
    assert res.kernel["calibrated"] and res.kernel["n_val"] == 200 and "leave-capture-out" in res.kernel["source"]


def test_cli_and_errors(world, tmp_path):
    world = world[0]
    out = str(tmp_path / "r.parquet")
    r = CliRunner().invoke(cli, ["--quiet", "retrieve", "--query", world["test"], "--database", world["train"], "-o", out,
                                 "-k", "8", "--mode", "kernel", "--val-store", world["val"]])
    assert r.exit_code == 0, r.output
    assert "calibrated density: widths" in r.output and "on 300 queries (validation store" in r.output
    r = CliRunner().invoke(cli, ["retrieve", "--query", world["test"], "--database", world["train"], "-o", out, "--val-store", world["val"]])
    assert r.exit_code == 1 and "add --mode kernel" in r.output and len(r.output.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="add --mode kernel"):
        RetrieveConfig(query="q", out="o", calibrate=True)


def test_bench_table_of_the_retrieval_rows(world, tmp_path):
    from geopipe.stages.bench_geoclip import GeoclipBenchConfig, run_geoclip_bench

    res = run_geoclip_bench(GeoclipBenchConfig(world=world[1], out=str(tmp_path / "b"), k=16, kernel_samples=64, generative=(),
                                               progress=False))
    assert [(r["split"], r["method"].split()[0]) for r in res.rows] == [(s, m) for s in ("test", "heldout")
                                                                       for m in ("kernel", "fixed", "calibrated")]
    test = {r["method"].split()[0]: r for r in res.rows if r["split"] == "test"}
    assert test["calibrated"]["nll_nats"] < test["fixed"]["nll_nats"] < test["kernel"]["nll_nats"]
    assert res.table.count("\n") == 7 and "| heldout (n=40) |" in res.table

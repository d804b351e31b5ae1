"""geopipe map defaults to the fast mode on a CPU (issue 19, item 6): mode auto = the KDE of model
samples on a CPU (the exact likelihood grid solves an ODE per cell: 61 s per map of a 64×2 flow
on a CPU before), the exact grid on a GPU; the choice is said in one line."""

from __future__ import annotations

import time

import torch
from click.testing import CliRunner
from tiny_models import tiny_store, untrained_checkpoint

from geopipe.flows.cli import cli
from geopipe.stages.maps import MAP_MODES, MapConfig, map_mode


def test_auto_is_the_default_and_picks_by_device():
    assert MapConfig("c", "s", "o").mode == "auto" and "auto" in MAP_MODES
    assert map_mode(torch.device("cpu")) == "kde" and map_mode(torch.device("cuda", 0)) == "loglik"
    assert "default: auto" in " ".join(CliRunner().invoke(cli, ["map", "--help"]).output.split())


def test_cpu_map_without_mode_draws_the_kde(tmp_path):
    store = tiny_store(tmp_path / "s.zarr")
    ckpt = untrained_checkpoint(tmp_path / "rfm", "rfm")  # a flow: loglik mode would solve 72 ODEs per record
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["map", "-c", ckpt, "--store", store, "-o", str(tmp_path / "m"), "--key", "rec/0",
                                 "--resolution", "30", "--kde-samples", "64", "--steps", "2", "--region", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "map: density by kde on cpu (--mode loglik draws the exact likelihood grid: a GPU job)" in r.stderr
    assert "point" not in r.stderr and time.perf_counter() - t0 < 60  # counted in records, not grid points

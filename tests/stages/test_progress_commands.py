"""Long commands show progress on stderr (plain lines off a terminal) and nothing under --quiet."""

from __future__ import annotations

import re

import numpy as np
import torch
from click.testing import CliRunner

from geopipe.flows.cli import cli


def _store_and_checkpoint(tmp_path):
    from geopipe.pipeline.artifacts.checkpoint import save_checkpoint
    from geopipe.pipeline.methods.registry import get_method
    from geopipe.pipeline.model.network import NetworkConfig
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(0)
    latlon = np.column_stack([rng.uniform(-60, 60, 3), rng.uniform(-180, 180, 3)])
    store = str(tmp_path / "s.zarr")
    with StoreWriter.open(store, backbone={"name": "identity"}, embed_dim=8, dtype="float32", normalize=True,
                          created_by={"version": "t"}) as w:
        w.append_shard("a.tar", rng.normal(size=(3, 8)), latlon, [f"rec/{i}" for i in range(3)], {}, [], ShardStat(1, 0.0))
    method = get_method("rfm")
    net = NetworkConfig(input_dim=3, dim=16, depth=2, expansion=2, cond_dim=8)
    torch.manual_seed(0)
    config = {"method": method.to_dict(), "network": net.to_dict(), "embed_dim": 8, "backbone": {"name": "identity"}, "step": 0}
    save_checkpoint(str(tmp_path / "ckpt"), model_state=method.build_model(net).state_dict(), config=config)
    return store, str(tmp_path / "ckpt")


def test_map_counts_grid_points_and_quiet_silences_it(tmp_path):
    store, ckpt = _store_and_checkpoint(tmp_path)
    args = ["map", "-c", ckpt, "--store", store, "-o", str(tmp_path / "m"), "--n-records", "2", "--resolution", "30",
            "--world", "--mode", "loglik", "--steps", "2", "--rtol", "1e-2", "--atol", "1e-2", "--device", "cpu"]
    loud = CliRunner().invoke(cli, args)
    assert loud.exit_code == 0, loud.output
    # 30° grid: 6 × 12 = 72 points per record, counted as the likelihood batches finish
    assert re.search(r"^map: 144/144 point \[.*point/s\]$", loud.stderr, re.M), loud.stderr
    quiet = CliRunner().invoke(cli, ["--quiet", *[str(tmp_path / "m2") if a == str(tmp_path / "m") else a for a in args]])
    assert quiet.exit_code == 0 and "point" not in quiet.stderr


def test_bench_counts_forward_passes(tmp_path):
    import contextlib
    import io

    from geopipe.stages.bench import BenchConfig, bench_nll, bench_predict

    err = io.StringIO()
    cfg = BenchConfig(dim=16, depth=2, cond_dim=8, batch=8, steps=2, nll_batch=4, repeats=1, device="cpu")
    with contextlib.redirect_stderr(err):
        pred = bench_predict(cfg)
        nll = bench_nll(cfg)
    assert "progress" not in pred and pred["records_per_s"] > 0
    assert re.search(r"^bench predict: 6/6 fwd", err.getvalue(), re.M), err.getvalue()
    assert re.search(rf"^bench nll: {nll['function_evals']} eval ", err.getvalue(), re.M), err.getvalue()

"""Checkpoint saves survive a real SIGKILL inside the save; resume refuses a changed store or
changed options unless told (and records them); an edited config or wrong weights fail in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.artifacts.checkpoint import checkpoint_files, load_checkpoint_config, load_model_weights, load_train_state
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.train import TrainConfig, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_store(path, n=96, d=8, seed=0, shards=2) -> str:
    """A real store of ``n`` random unit embeddings with random locations, in ``shards`` shards."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    ll = np.stack([rng.uniform(-80, 80, n), rng.uniform(-180, 179, n)], axis=1)
    keys = [f"s{seed}-{i:04d}" for i in range(n)]
    w = StoreWriter.open(str(path), backbone={"name": "test", "pretrained": None}, embed_dim=d, dtype="float32")
    with w:
        for s, idx in enumerate(np.array_split(np.arange(n), shards)):
            w.append_shard(f"shard-{s}", emb[idx], ll[idx], [keys[i] for i in idx], {}, [], ShardStat(1, 0.0))
    return str(path)


def _cfg(store, out, **kw):
    base = dict(store=store, out=str(out), dim=16, depth=1, expansion=2, steps=20, batch_size=16, warmup=2, val_every=10,
                device="cpu", progress=False, stream=False)
    return TrainConfig(**{**base, **kw})


# Runs `geopipe train` for real; its second save (step 20) writes half the model file, says so, and
# waits to be killed: a SIGKILL inside the save, after the train state of step 20 is written.
_PAUSED_SAVE = r"""
import os, sys, time
import geopipe.pipeline.core.fsio as fsio
from geopipe.flows.cli import main
real, marker = fsio.write_atomic, sys.argv[1]

def write_atomic(url, data):
    if os.path.basename(url).startswith("model-00000020-"):
        with open(os.path.join(os.path.dirname(url), "." + os.path.basename(url) + ".0123456789ab.tmp"), "wb") as fh:
            fh.write(data[: len(data) // 2])
        open(marker, "w").close()
        time.sleep(600)
    real(url, data)

fsio.write_atomic = write_atomic
sys.argv = ["geopipe", *sys.argv[2:]]
main()
"""


def test_sigkill_inside_a_checkpoint_save_keeps_the_last_complete_save(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    out, marker = tmp_path / "m", tmp_path / "paused"
    args = ["train", "--store", store, "-o", str(out), "--dim", "16", "--depth", "1", "--steps", "30", "--batch-size", "16",
            "--warmup", "2", "--val-every", "10", "--device", "cpu", "--in-memory"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_SAVE, str(marker), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the save never reached its kill point"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert any(p.name.startswith("train_state-00000020-") for p in out.iterdir())  # killed mid-save, after its train state
    assert load_checkpoint_config(out)["step"] == 10  # the last complete save
    assert load_train_state(out)[1]["step"] == 10 and load_model_weights(out)
    res = CliRunner().invoke(cli, ["predict", "-c", str(out), "--store", store, "-o", str(tmp_path / "p.parquet"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    cli_like = dict(steps=30, expansion=4, lr=8e-4)  # the options of the killed `geopipe train`
    resumed = run_train(_cfg(store, out, **cli_like))  # the same command resumes from step 10
    assert resumed.step == 30
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", *(p.name for p in checkpoint_files(out).values())])
    ref = run_train(_cfg(store, tmp_path / "ref", **cli_like))
    assert ref.step == 30
    a, b = load_model_weights(out), load_model_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed run = uninterrupted run


def test_resume_refuses_another_store_or_changed_options_unless_allowed(tmp_path):
    s1, s2 = small_store(tmp_path / "a.zarr"), small_store(tmp_path / "b.zarr", seed=1)
    out = tmp_path / "m"
    run_train(_cfg(s1, out, steps=10))
    with pytest.raises(GeopipeError, match=r"with a different store \(data_fingerprint: .*--allow-changes"):
        run_train(_cfg(s2, out, steps=20))
    with pytest.raises(GeopipeError, match=r"different settings \(train\.batch_size: 16 → 32; train\.lr: 0\.0008 → 0\.001\)"):
        run_train(_cfg(s1, out, steps=20, lr=1e-3, batch_size=32))
    assert load_checkpoint_config(out)["step"] == 10  # nothing was rewritten
    assert run_train(_cfg(s1, out, steps=20)).step == 20  # more steps are not a change
    assert run_train(_cfg(s1, out, steps=30, lr=1e-3, allow_changes=True)).step == 30
    cfg = load_checkpoint_config(out)
    assert cfg["changes"] == [{"step": 20, "changed": {"train.lr": [0.0008, 0.001]}}]
    assert cfg["train"]["lr"] == 1e-3


def test_cli_resume_guard_and_out_file_are_one_line(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    (tmp_path / "file").write_text("x")
    base = ["train", "--store", store, "--dim", "16", "--depth", "1", "--steps", "10", "--batch-size", "16", "--warmup", "2",
            "--val-every", "10", "--device", "cpu", "--in-memory"]
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "file")])
    assert res.exit_code == 1 and res.output.strip().splitlines() == [
        f"geopipe: error: --out {tmp_path / 'file'} exists and is not a directory; give a checkpoint directory"]
    assert CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "m")]).exit_code == 0
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "m"), "--lr", "0.01"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and "train.lr: 0.0008 → 0.01" in res.output
    res = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "m"), "--lr", "0.01", "--allow-changes"])
    assert res.exit_code == 0, res.output


def test_predict_refuses_edited_config_and_wrong_weights_in_one_line(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    out = tmp_path / "m"
    run_train(_cfg(store, out, steps=10))
    args = ["predict", "-c", str(out), "--store", store, "-o", str(tmp_path / "p.parquet"), "--device", "cpu"]
    cfg_path = out / "config.json"
    good = json.loads(cfg_path.read_text())
    for key, value, expect in (("depth", 10**9, "network depth = 1000000000 is outside 1..256"),
                               ("depth", 3, "the weights do not match config.json's network"),
                               ("dim", 32, "the weights do not match config.json's network")):
        cfg_path.write_text(json.dumps({**good, "network": {**good["network"], key: value}}))
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1 and expect in res.output, res.output
    cfg_path.write_text(json.dumps(good))
    assert CliRunner().invoke(cli, args).exit_code == 0


def test_weights_of_another_shape_are_one_line(tmp_path):
    """model.safetensors replaced by weights of another network (config.json untouched)."""
    store = small_store(tmp_path / "s.zarr")
    run_train(_cfg(store, tmp_path / "a", steps=10))
    run_train(_cfg(store, tmp_path / "b", steps=10, dim=24))
    target = checkpoint_files(tmp_path / "a")["model"]
    target.write_bytes(checkpoint_files(tmp_path / "b")["model"].read_bytes())
    res = CliRunner().invoke(cli, ["predict", "-c", str(tmp_path / "a"), "--store", store, "-o", str(tmp_path / "p.parquet"),
                                   "--device", "cpu"])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert "the weights do not match config.json's network" in res.output and "weights (24" in res.output


def test_resume_does_not_depend_on_path_spelling_and_a_moved_checkpoint_resumes(tmp_path, monkeypatch):
    """./s.zarr --out ./m_p/, absolute paths, from the parent directory, and after `mv m_p moved`:
    each resume is accepted and gives the weights of the same resumes spelled one way (before:
    refused as "different settings (train.out: ...)")."""
    work = tmp_path / "work"
    work.mkdir()
    store = small_store(work / "s.zarr")
    monkeypatch.chdir(work)
    assert run_train(_cfg("./s.zarr", "./m_p/", steps=10)).step == 10
    assert run_train(_cfg(str(work / "s.zarr"), str(work / "m_p"), steps=20)).step == 20
    monkeypatch.chdir(tmp_path)
    assert run_train(_cfg("work/s.zarr", "work/m_p", steps=30)).step == 30
    os.rename(work / "m_p", tmp_path / "moved")
    assert run_train(_cfg("work/./s.zarr", "moved", steps=40)).step == 40
    saved = load_checkpoint_config(tmp_path / "moved")
    assert saved["step"] == 40 and not saved.get("changes")
    for steps in (10, 20, 30, 40):  # the same resumes, spelled one way, never moved
        run_train(_cfg(store, tmp_path / "ref", steps=steps))
    a, b = load_model_weights(tmp_path / "moved"), load_model_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(GeopipeError, match="with a different store"):  # the store itself is still compared
        run_train(_cfg(small_store(tmp_path / "other.zarr", seed=1), tmp_path / "moved", steps=50))

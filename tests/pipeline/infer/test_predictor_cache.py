"""The predictor cache follows the checkpoint's content: retraining into the same directory and
predicting again in one process uses the new weights (the model is reused only while unchanged)."""

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import torch

from geopipe.pipeline.infer.predictor import cached_predictor
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.train import TrainConfig, run_train

CPU = torch.device("cpu")


def _train(store, out, *, seed, steps):
    run_train(TrainConfig(store=store, out=out, method="rfm", dim=16, depth=1, steps=steps, warmup=1, batch_size=32,
                          val_every=steps, seed=seed, resume=False, device="cpu", progress=False))


def _predict(ckpt, store, out):
    cfg = PredictConfig(checkpoint=ckpt, store=store, out=out, steps=2, batch_size=64, device="cpu", progress=False)
    run_predict(cfg)
    table = pq.read_table(out)
    return np.stack([table.column("lat").to_numpy(), table.column("lon").to_numpy()], axis=1), cfg


def test_retrain_into_same_directory_is_seen_by_the_next_predict(demo_stores, tmp_path):
    ckpt = str(tmp_path / "model")
    _train(demo_stores["train"], ckpt, seed=1, steps=4)
    first, _ = _predict(ckpt, demo_stores["test"], str(tmp_path / "a.parquet"))
    p_first = cached_predictor(ckpt, CPU, None)
    assert cached_predictor(ckpt, CPU, None) is p_first  # unchanged checkpoint: loaded once

    _train(demo_stores["train"], ckpt, seed=2, steps=6)  # same directory, --no-resume
    second, cfg = _predict(ckpt, demo_stores["test"], str(tmp_path / "b.parquet"))
    assert cached_predictor(ckpt, CPU, None) is not p_first
    assert not np.allclose(first, second)

    # The same numbers as a fresh process that never saw the first model.
    fresh = str(tmp_path / "c.parquet")
    subprocess.run([sys.executable, "-m", "geopipe", "predict", "-c", ckpt, "--store", cfg.store, "-o", fresh, "--steps",
                    str(cfg.steps), "--batch-size", str(cfg.batch_size), "--device", "cpu"], check=True, capture_output=True)
    table = pq.read_table(fresh)
    np.testing.assert_array_equal(second, np.stack([table.column("lat").to_numpy(), table.column("lon").to_numpy()], axis=1))

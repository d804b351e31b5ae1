"""geopipe train streaming from the store: a crash mid-run resumes to the uninterrupted weights."""

import numpy as np
import pytest
import torch

from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config, load_model_weights
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages import train as train_stage
from geopipe.stages.train import TrainConfig, run_train

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 8, "preprocess": {"size": 8}, "fingerprint": "abc"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "s.zarr"
    rng = np.random.default_rng(0)
    n = 300
    ll = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)])
    emb = np.concatenate([ll / 90, rng.normal(size=(n, 6))], axis=1)
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=8, dtype="float16", chunk_rows=32) as w:
        for s in range(0, n, 100):
            w.append_shard(f"s{s}.tar", emb[s : s + 100], ll[s : s + 100], [f"k{i}" for i in range(s, s + 100)], {}, [],
                           ShardStat(1, 1.0))
    return str(path)


def _cfg(store, out, **kw):
    opts = dict(method="rfm", dim=16, depth=2, expansion=2, steps=8, batch_size=24, warmup=2, val_every=3, val_batches=2,
                lr=1e-3, progress=False, device="cpu", stream=True, buffer_chunks=2)
    opts.update(kw)
    return TrainConfig(store=store, out=str(out), **opts)


class _Crash(Exception):
    pass


def test_streamed_resume_equals_uninterrupted(store, tmp_path, monkeypatch):
    ref = run_train(_cfg(store, tmp_path / "ref"))
    assert ref.step == 8 and np.isfinite(ref.val_loss) and ref.n_train + ref.n_val == 300

    real_save = train_stage._save

    def crash_after_step_6(cfg, model, optimizer, ema, generator, config, step, history):
        real_save(cfg, model, optimizer, ema, generator, config, step, history)
        if step == 6:
            raise _Crash  # as if killed right after the step-6 checkpoint

    monkeypatch.setattr(train_stage, "_save", crash_after_step_6)
    with pytest.raises(_Crash):
        run_train(_cfg(store, tmp_path / "cut"))
    monkeypatch.setattr(train_stage, "_save", real_save)
    assert load_checkpoint_config(str(tmp_path / "cut"))["step"] == 6
    res = run_train(_cfg(store, tmp_path / "cut"))
    assert res.step == 8 and res.val_loss == ref.val_loss
    a, b = load_model_weights(str(tmp_path / "ref")), load_model_weights(str(tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stream_and_in_memory_train_the_same_split(store, tmp_path):
    s = run_train(_cfg(store, tmp_path / "s", steps=3))
    m = run_train(_cfg(store, tmp_path / "m", steps=3, stream=False))
    assert (s.n_train, s.n_val) == (m.n_train, m.n_val)
    cs, cm = load_checkpoint_config(str(tmp_path / "s")), load_checkpoint_config(str(tmp_path / "m"))
    np.testing.assert_allclose(cs["condition"]["mean"], cm["condition"]["mean"], atol=1e-9)
    np.testing.assert_allclose(cs["condition"]["std"], cm["condition"]["std"], atol=1e-9)

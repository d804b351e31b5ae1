"""``likelihood_every=K``: the likelihood columns only for store rows r % K == 0, the point
predictions unchanged, and the selected rows' NLL the same as when every row is scored."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def tiny_model(demo_stores, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("every") / "model")
    run_train(TrainConfig(store=demo_stores["train"], out=out, method="rfm", dim=16, depth=1, steps=4, warmup=1,
                          batch_size=32, val_every=4, seed=0, resume=False, device="cpu", progress=False))
    return out


def _predict(ckpt, store, out, every):
    run_predict(PredictConfig(checkpoint=ckpt, store=store, out=out, steps=2, batch_size=40, nll=True, localizability=2,
                              rtol=1e-3, atol=1e-3, likelihood_every=every, device="cpu", progress=False))
    return pq.read_table(out).to_pandas()


def test_every_kth_record_is_scored_and_points_do_not_change(tiny_model, demo_stores, tmp_path):
    full = _predict(tiny_model, demo_stores["test"], str(tmp_path / "all.parquet"), 1)
    part = _predict(tiny_model, demo_stores["test"], str(tmp_path / "every3.parquet"), 3)
    np.testing.assert_array_equal(full[["lat", "lon"]].to_numpy(), part[["lat", "lon"]].to_numpy())
    rows = np.arange(len(part))
    scored = rows % 3 == 0
    for col in ("log_likelihood", "neg_entropy_nats", "hdr_rank"):
        assert np.isfinite(part[col].to_numpy()[scored]).all(), col
        assert np.isnan(part[col].to_numpy()[~scored]).all(), col
    # The same records' NLL as when every record is scored, up to the adaptive solver's tolerance
    # (its step sizes follow the whole batch, and the batches differ).
    a, b = part["log_likelihood"].to_numpy()[scored], full["log_likelihood"].to_numpy()[scored]
    assert np.abs(a - b).mean() < 0.1 and np.corrcoef(a, b)[0, 1] > 0.98


def test_likelihood_every_must_be_positive(tiny_model, demo_stores, tmp_path):
    with pytest.raises(GeopipeError, match="likelihood_every"):
        _predict(tiny_model, demo_stores["test"], str(tmp_path / "x.parquet"), 0)

"""Every method trains a few steps on the tiny fixture, predicts with exact NLL, and evaluate compares them."""

import numpy as np
import pyarrow.parquet as pq

from geopipe.pipeline.methods.registry import METHODS as REGISTRY
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.train import TrainConfig, run_train

METHODS = tuple(REGISTRY)  # every registered method, including ones added later


def test_all_methods_train_predict_and_compare(demo_stores, tmp_path):
    paths = []
    for method in METHODS:
        ckpt = str(tmp_path / method)
        res = run_train(TrainConfig(store=demo_stores["train"], out=ckpt, method=method, dim=32, depth=1, steps=6, warmup=1,
                                    batch_size=32, val_every=3, device="cpu", progress=False))
        assert np.isfinite(res.val_loss) or method == "uniform"
        out = str(tmp_path / f"{method}.parquet")
        run_predict(PredictConfig(checkpoint=ckpt, store=demo_stores["test"], out=out, steps=3, nll=True, localizability=4,
                                  rtol=1e-3, atol=1e-3, device="cpu", progress=False))
        table = pq.read_table(out)
        assert np.isfinite(table.column("log_likelihood").to_numpy()).all(), method
        assert np.isfinite(table.column("lat").to_numpy()).all()
        assert np.isfinite(table.column("neg_entropy_nats").to_numpy()).all(), method
        rank = table.column("hdr_rank").to_numpy()
        assert ((rank >= 0) & (rank <= 1)).all(), method
        area = table.column("effective_area_km2").to_numpy()  # R³ densities have no area
        assert np.isnan(area).all() if REGISTRY[method].space == "r3" else (area > 0).all(), method
        paths.append(out)
    ev = run_evaluate(EvaluateConfig(predictions=tuple(paths), names=METHODS))
    assert len(ev.reports) == len(METHODS)
    for method in METHODS:
        assert method in ev.table
    uniform = next(r for r in ev.reports if r["name"] == "uniform")
    assert abs(uniform["nll"]["nll_bits_per_dim"] - 1.2171653765) < 1e-6
    assert abs(uniform["localizability"]["median_effective_area_km2"] / 5.100656e8 - 1) < 1e-6  # the Earth's area
    for r in ev.reports:
        assert (r["localizability"]["median_effective_area_km2"] is None) == (REGISTRY[r["method"]].space == "r3")

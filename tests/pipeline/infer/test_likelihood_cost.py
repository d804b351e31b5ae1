"""The expected time of --nll/--localizability is said before a run starts: a probe on a few
records, the run's likelihood record count, and --likelihood-every suggested when it is long."""

from __future__ import annotations

import pytest

from geopipe.pipeline.infer.cost import MIN_PROBED_RUN, SUGGEST_AFTER_S, LikelihoodCost, likelihood_records


def test_records_and_suggestion():
    assert likelihood_records(10, 1) == 10 and likelihood_records(10, 3) == 4 and likelihood_records(0, 5) == 0
    short = LikelihoodCost(0.5, 100, 4)
    assert short.expected_s == 50 and short.suggested_every() is None
    assert short.message("predict", "--nll") == ("geopipe: predict: --nll take about 0.5 s per record (probe of 4 records): "
                                                 "about 50 s for 100 records")
    long = LikelihoodCost(1.2, 10_000, 4)  # 3 h 20 min
    k = long.suggested_every()
    assert k == 20 and long.seconds_per_record * likelihood_records(10_000, k) <= SUGGEST_AFTER_S
    assert "about 3 h 20 min for 10,000 records; --likelihood-every 20 scores one record in 20 (about 10 min)" in long.message(
        "predict", "--nll and --localizability 32")
    assert LikelihoodCost(1.2, 5_000, 4, every=2).suggested_every() == 2 * 10  # on top of the run's own K


@pytest.mark.parametrize("every,said", [(1, True), (100, False)])
def test_predict_says_the_expected_time_before_starting(tmp_path, capsys, every, said):
    from tiny_models import tiny_store, untrained_checkpoint

    from geopipe.stages.predict import PredictConfig, run_predict

    store = tiny_store(tmp_path / "s.zarr", n=MIN_PROBED_RUN + 6)
    ckpt = untrained_checkpoint(tmp_path / "m", "rfm")
    run_predict(PredictConfig(checkpoint=ckpt, store=store, out=str(tmp_path / "p.parquet"), steps=2, nll=True, localizability=2,
                              rtol=1e-3, atol=1e-3, likelihood_every=every, device="cpu", progress=False))
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "per record" in x]
    if not said:  # 1 likelihood record: not worth a probe
        assert not line
        return
    assert len(line) == 1 and line[0].startswith("geopipe: predict: --nll and --localizability 2 take about ")
    assert f"for {MIN_PROBED_RUN + 6} records" in line[0]

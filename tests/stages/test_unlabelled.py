"""Unlabelled records (no location) are first-class: extracted and imported with latlon NaN and
counted, skipped by train with a count, predicted with null truth, left out of evaluate with a count."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from samples import good_sample, jpeg

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.ingest.pairs import PairError
from geopipe.pipeline.ingest.shards import write_shards
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.verify import store_info, verify_store
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.schemas.report import validate_report
from geopipe.schemas.store import validate_store_attrs
from geopipe.stages.evaluate import EvaluateConfig, run_evaluate, store_mean_direction
from geopipe.stages.extract import ExtractConfig, run_extract
from geopipe.stages.import_embeddings import ImportConfig, run_import
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve
from geopipe.stages.train import TrainConfig, run_train

PER_SHARD, SHARDS = 16, 2


def _sample(i: int) -> dict:
    """Every 4th sample from 1 has no json, every 4th from 3 a json without coordinates (one of
    them with both null): 8 unlabelled of 32."""
    key = f"s{i:03d}"
    if i % 4 == 1:
        return {"__key__": key, "jpg": jpeg(i)}
    if i % 4 == 3:
        coords = {"latitude": None, "longitude": None} if i == 3 else {}
        return {"__key__": key, "jpg": jpeg(i), "json": {"city": f"c{i}", **coords}}
    return good_sample(key, i)


UNLABELLED = [f"s{i:03d}" for i in range(PER_SHARD * SHARDS) if i % 2 == 1]
BAD = [  # one coordinate without the other, or NaN: still rejects
    ({"__key__": "onlylat", "jpg": jpeg(90), "json": {"latitude": 10.0}}, "missing_coordinates"),
    ({"__key__": "nulllon", "jpg": jpeg(91), "json": {"latitude": 10.0, "longitude": None}}, "missing_coordinates"),
    ({"__key__": "nanlat", "jpg": jpeg(92), "json": {"latitude": float("nan"), "longitude": 3.0}}, "invalid_coordinates"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store extracted with the tiny backbone from shards mixing labelled, unlabelled and bad
    samples; a tiny model trained on it; its predictions."""
    root = tmp_path_factory.mktemp("unlabelled")
    samples = [_sample(i) for i in range(PER_SHARD * SHARDS)]
    samples[5:5] = [s for s, _ in BAD]
    shards = write_shards(root / "shards", samples, "u", PER_SHARD)
    store = str(root / "s.zarr")
    res = run_extract(ExtractConfig(shards=tuple(shards), store=store, batch_size=8, num_workers=0, progress=False))
    return {"root": root, "store": store, "extract": res, "shards": shards}


def _train(store, out, **kw):
    return run_train(TrainConfig(store=store, out=str(out), dim=16, depth=1, expansion=2, steps=4, batch_size=8, warmup=1,
                                 val_every=4, val_fraction=0.2, device="cpu", progress=False, **kw))


def test_extract_keeps_unlabelled_records_and_counts_them(world, capsys):
    res, store = world["extract"], world["store"]
    n = PER_SHARD * SHARDS
    assert (res.n_ok, res.n_unlabelled, res.n_rejected) == (n, len(UNLABELLED), len(BAD))
    assert res.rejects_by_reason == {"missing_coordinates": 2, "invalid_coordinates": 1}
    assert f"{n} ok ({n - len(UNLABELLED)} labelled, {len(UNLABELLED)} unlabelled)" in res.summary()
    rej = {r["key"]: r["reason"] for r in open_store(store).rejects().to_pylist()}
    assert rej == {s["__key__"]: reason for s, reason in BAD}
    d = read_store(store)
    nan = np.isnan(d.latlon)
    assert (nan[:, 0] == nan[:, 1]).all()  # both or neither
    assert sorted(d.keys[nan[:, 0]].tolist()) == UNLABELLED
    assert np.isfinite(d.embeddings.astype(np.float32)).all()
    from geopipe.pipeline.eval.metrics import constant_baseline

    assert store_mean_direction(store) == pytest.approx(constant_baseline(d.latlon[~nan[:, 0]]))  # the baseline of labelled rows
    assert d.meta["city"][d.keys.tolist().index("s007")] == '"c7"'  # an unlabelled json keeps its other fields
    s = open_store(store)
    assert s.labelled == s.attrs["labelled"] == n - len(UNLABELLED) and validate_store_attrs(s.attrs) == []
    assert sum(r["labelled"] for r in s.attrs["shards"].values()) == s.labelled
    assert verify_store(store) == []
    assert f"rows: {n} ({n - len(UNLABELLED)} labelled, {len(UNLABELLED)} unlabelled)" in store_info(store).lines()
    out = CliRunner().invoke(cli, ["store", "verify", store])
    assert out.exit_code == 0 and out.output.startswith(f"{store}: OK, {n} rows ({n - len(UNLABELLED)} labelled, "
                                                        f"{len(UNLABELLED)} unlabelled)")


def test_store_counts_survive_truncation_and_old_stores(tmp_path):
    """The writer keeps ``labelled`` through appends and truncation, counts it for a store
    written before it existed, and still refuses one NaN coordinate; verify finds a wrong count."""
    path, rng = str(tmp_path / "w.zarr"), np.random.default_rng(0)
    ll = np.array([[1.0, 2.0], [np.nan, np.nan], [3.0, 4.0]])
    with StoreWriter.open(path, backbone={"name": "t", "pretrained": None}, embed_dim=4, dtype="float32") as w:
        w.append_shard("a", rng.normal(size=(3, 4)), ll, ["a0", "a1", "a2"], {}, [], ShardStat(1, 0.0))
        with pytest.raises(ValueError, match="non-finite coordinates .*'b1'"):
            w.append_shard("b", rng.normal(size=(2, 4)), [[1.0, 1.0], [np.nan, 5.0]], ["b0", "b1"], {}, [], ShardStat(1, 0.0))
        w.append_shard("b", rng.normal(size=(2, 4)), [[np.nan, np.nan]] * 2, ["b0", "b1"], {}, [], ShardStat(1, 0.0))
        assert w.attrs["labelled"] == 2 and w.shards["b"]["labelled"] == 0
        w.truncate(1)
        assert w.attrs["labelled"] == 2 and w.rows == 3
    doc = json.loads((tmp_path / "w.zarr" / "zarr.json").read_text())
    for rec in doc["attributes"]["shards"].values():
        del rec["labelled"]
    del doc["attributes"]["labelled"]  # a store written before the counts
    (tmp_path / "w.zarr" / "zarr.json").write_text(json.dumps(doc))
    assert open_store(path).labelled == 2 and verify_store(path) == []
    with StoreWriter.open(path, backbone={"name": "t", "pretrained": None}, embed_dim=4, dtype="float32") as w:
        w.append_shard("c", rng.normal(size=(1, 4)), [[5.0, 6.0]], ["c0"], {}, [], ShardStat(1, 0.0))
    assert open_store(path).attrs["labelled"] == 3 and verify_store(path) == []
    doc = json.loads((tmp_path / "w.zarr" / "zarr.json").read_text())
    doc["attributes"]["labelled"] = 4
    (tmp_path / "w.zarr" / "zarr.json").write_text(json.dumps(doc))
    assert verify_store(path) == ["attrs labelled says 4 rows have a location, 3 do"]


def test_train_uses_labelled_rows_and_says_how_many_it_skipped(world, tmp_path, capsys):
    labelled = PER_SHARD * SHARDS - len(UNLABELLED)
    for stream in (False, True):
        res = _train(world["store"], tmp_path / f"m{stream}", stream=stream)
        err = capsys.readouterr().err
        assert res.n_unlabelled == len(UNLABELLED) and res.n_train + res.n_val == labelled, stream
        assert np.isfinite(res.train_loss) and np.isfinite(res.val_loss)
        assert f"skipping {len(UNLABELLED)} unlabelled rows of {world['store']} (no location); training on {labelled} labelled rows" in err
        cfg = json.loads((tmp_path / f"m{stream}" / "config.json").read_text())
        assert cfg["rows"] == {"labelled": labelled, "unlabelled": len(UNLABELLED), "train": res.n_train, "validation": res.n_val}


def test_a_store_without_labelled_rows_is_a_one_line_training_error(tmp_path):
    path = str(tmp_path / "none.zarr")
    with StoreWriter.open(path, backbone={"name": "t", "pretrained": None}, embed_dim=4, dtype="float32") as w:
        w.append_shard("a", np.ones((5, 4)), np.full((5, 2), np.nan), [f"k{i}" for i in range(5)], {}, [], ShardStat(1, 0.0))
    for stream in (False, True):
        with pytest.raises(GeopipeError, match=r"^store .* has no labelled rows \(its 5 records have no location\)"):
            _train(path, tmp_path / "m", stream=stream)


@pytest.fixture(scope="module")
def predictions(world):
    model = world["root"] / "model"
    _train(world["store"], model, stream=False)
    out = str(world["root"] / "p.parquet")
    res = run_predict(PredictConfig(checkpoint=str(model), store=world["store"], out=out, steps=2, nll=True, localizability=2,
                                    rtol=1e-2, atol=1e-2, batch_size=16, device="cpu", progress=False))
    return out, res


def test_predict_writes_null_truth_for_unlabelled_records(predictions, world, capfd):
    out, res = predictions
    assert res.n_unlabelled == len(UNLABELLED)
    t = pq.read_table(out)
    keys = t.column("key").to_pylist()
    unl = np.array([k in UNLABELLED for k in keys])
    for name in ("true_lat", "true_lon", "distance_km", "log_likelihood", "hdr_rank"):
        valid = t.column(name).is_valid().to_numpy(zero_copy_only=False)
        assert (valid == ~unl).all(), name  # null, not NaN, exactly for the unlabelled records
        assert np.isfinite(t.column(name).to_numpy(zero_copy_only=False)[~unl]).all(), name
    for name in ("lat", "lon", "neg_entropy_nats"):  # every record is geolocated
        assert np.isfinite(t.column(name).to_numpy(zero_copy_only=False)).all(), name
    capfd.readouterr()
    run_predict(PredictConfig(checkpoint=str(world["root"] / "model"), store=world["store"], out=out + ".2.parquet", steps=2,
                              batch_size=16, device="cpu", progress=False))
    assert f"{len(UNLABELLED)} of {PER_SHARD * SHARDS} records of {world['store']} are unlabelled" in capfd.readouterr().err


def test_evaluate_scores_labelled_rows_and_counts_the_others(predictions, tmp_path, capsys):
    out, _ = predictions
    n, u = PER_SHARD * SHARDS, len(UNLABELLED)
    res = run_evaluate(EvaluateConfig(predictions=(out,), out=str(tmp_path / "r.json")))
    (entry,) = res.reports
    assert entry["n"] == n and entry["n_unlabelled"] == u
    assert entry["distance"]["n"] == entry["nll"]["n"] == entry["calibration"]["n"] == entry["localizability"]["n"] == n - u
    assert entry["prdc"]["n_real"] == n - u
    assert validate_report(json.loads((tmp_path / "r.json").read_text())) == []
    assert f"p: scored {n - u} labelled records; left out {u} unlabelled ones (no true location)" in capsys.readouterr().err
    assert any(line.split() == ["unlabelled", "(left", "out)", str(u)] for line in res.table.splitlines())


def test_evaluate_a_file_of_unlabelled_records_only(tmp_path, capsys):
    from geopipe.pipeline.artifacts.predictions import predictions_metadata, predictions_table, write_predictions

    n = 6
    cols = {"key": [f"k{i}" for i in range(n)], "lat": np.zeros(n), "lon": np.zeros(n), "true_lat": np.full(n, np.nan),
            "true_lon": np.full(n, np.nan), "neg_entropy_nats": np.ones(n)}
    path = str(tmp_path / "u.parquet")
    write_predictions(predictions_table(cols, n), path, predictions_metadata({}, {"method": "rfm", "space": "sphere"}, {}))
    assert pq.read_table(path).column("true_lat").null_count == n
    (entry,) = run_evaluate(EvaluateConfig(predictions=(path,))).reports
    assert entry["n_unlabelled"] == n and entry["distance"] is None and entry["localizability"]["n"] == n
    assert "u: all 6 records are unlabelled (no true location)" in capsys.readouterr().err


def test_retrieve_keeps_unlabelled_queries_and_skips_unlabelled_database_rows(world, tmp_path, capsys):
    n, u = PER_SHARD * SHARDS, len(UNLABELLED)
    out = str(tmp_path / "r.parquet")
    res = run_retrieve(RetrieveConfig(query=world["store"], database=world["store"], out=out, k=3, mode="kernel", kernel_val=8,
                                      kernel_samples=16, progress=False))
    assert (res.n_queries, res.n_database, res.n_database_unlabelled) == (n, n - u, u)
    assert res.recall["n"] == n - u and res.recall["n_unlabelled"] == u
    assert f"{u} unlabelled queries geolocated with null truth and left out of Recall@K; {u} unlabelled database rows skipped" in \
        capsys.readouterr().err
    t = pq.read_table(out)
    unl = np.array([k in UNLABELLED for k in t.column("key").to_pylist()])
    for name in ("true_lat", "true_lon", "distance_km", "log_likelihood", "hdr_rank", "answerable"):
        assert (t.column(name).is_valid().to_numpy(zero_copy_only=False) == ~unl).all(), name
    assert np.isfinite(t.column("lat").to_numpy()).all() and np.isfinite(t.column("neg_entropy_nats").to_numpy()).all()
    assert not {k for row in t.column("topk_keys").to_pylist() for k in row} & set(UNLABELLED)  # they cannot vote
    (entry,) = run_evaluate(EvaluateConfig(predictions=(out,))).reports
    assert entry["n_unlabelled"] == u and entry["retrieval"]["n"] == n - u and entry["retrieval"]["n_unlabelled"] == u
    none = str(tmp_path / "none.zarr")
    with StoreWriter.open(none, backbone={"name": "t", "pretrained": None}, embed_dim=4, dtype="float32") as w:
        w.append_shard("a", np.ones((3, 4)), np.full((3, 2), np.nan), ["k0", "k1", "k2"], {}, [], ShardStat(1, 0.0))
    with pytest.raises(GeopipeError, match="database store .* has no labelled records"):
        run_retrieve(RetrieveConfig(query=none, database=none, out=str(tmp_path / "x.parquet"), k=1, progress=False))


def _pair(root, name, table, n, seed=0):
    np.save(root / f"{name}.npy", np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32))
    pq.write_table(table, root / f"{name}.parquet")
    return str(root / f"{name}.npy")


def test_import_keeps_rows_without_coordinates_as_unlabelled(tmp_path):
    src = tmp_path / "src"
    os.makedirs(src)
    a = _pair(src, "a", pa.table({"key": ["a0", "a1", "a2", "a3", "a4"], "latitude": [1.0, None, 2.0, None, float("nan")],
                                  "longitude": [1.0, None, None, 5.0, 1.0]}), 5)
    b = _pair(src, "b", pa.table({"key": ["b0", "b1"], "city": ["x", "y"]}), 2, seed=1)  # no coordinate columns at all
    store = str(tmp_path / "s.zarr")
    res = run_import(ImportConfig(sources=(a, b), store=store, backbone_name="E", max_reject_fraction=0.9, progress=False))
    assert (res.n_ok, res.n_unlabelled, res.n_rejected) == (4, 3, 3)
    rej = [(r["key"], r["reason"]) for r in open_store(store).rejects().to_pylist()]
    assert rej == [("a2", "missing_coordinates"), ("a3", "missing_coordinates"), ("a4", "invalid_coordinates")]
    d = read_store(store)
    assert d.keys.tolist() == ["a0", "a1", "b0", "b1"] and np.isnan(d.latlon[1:]).all() and d.latlon[0].tolist() == [1.0, 1.0]
    assert open_store(store).labelled == 1 and verify_store(store) == []
    c = _pair(src, "c", pa.table({"key": ["c0"], "latitude": [1.0]}), 1)  # one coordinate column: a misnamed column
    with pytest.raises(PairError, match=r"columns \['longitude'\] not found"):
        run_import(ImportConfig(sources=(c,), store=store, backbone_name="E", progress=False))
    out = CliRunner().invoke(cli, ["import", b, "--store", str(tmp_path / "cli.zarr"), "--backbone-name", "E"])
    assert out.exit_code == 0 and ": 2 ok (0 labelled, 2 unlabelled), 0 rejected;" in out.output
    assert "none of the 2 records added" in out.output  # all unlabelled: said, not silent

"""A generated VPR-layout dataset (UTM names, ~200 images) end to end: extract with typed UTM
metadata and invalid_name rejects, retrieve --positives utm against a brute-force 25 m oracle
(boundary inclusive), BayesCap on CosPlace-class pairs, and geopipe vpr-eval's tables."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from vpr_dataset import write_vpr_dataset

from geopipe.flows.cli import cli
from geopipe.pipeline.store.reader import open_store
from geopipe.stages.extract import ExtractConfig, run_extract
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve


@pytest.fixture(scope="module")
def vpr(tmp_path_factory):
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    root = tmp_path_factory.mktemp("vpr")
    data = write_vpr_dataset(str(root))
    tiny = load_backbone(BackboneSpec("tiny"))
    stores = {}
    for side, folder in (("db", data["database"]), ("q", data["queries"])):
        stores[side] = str(root / f"{side}.zarr")
        stores[f"{side}_result"] = run_extract(ExtractConfig(shards=(folder,), store=stores[side], labels="vpr-name", batch_size=64,
                                                             num_workers=0, progress=False), backbone=tiny)
    return {**data, **stores, "root": root}


def _meta(store, name):
    return [json.loads(v) if v else None for v in np.asarray(open_store(store).meta[name][:]).tolist()]


def test_extract_keeps_typed_utm_latlon_heading_and_rejects_bad_names(vpr):
    db, res = vpr["db"], vpr["db_result"]
    assert (res.n_ok, res.n_rejected, res.rejects_by_reason) == (150, 3, {"invalid_name": 3})
    rejects = open_store(db).rejects().to_pydict()
    assert sorted(rejects["key"]) == ["@584000.00@4477000.00@@@@@p@@@@@@@@", "@abc@4477000.00@17@T@@@p@@@@@@@@", "holiday_photo"]
    assert any("nothing places it on the globe" in d for d in rejects["detail"])
    st = open_store(db)
    keys = np.asarray(st.keys[:]).astype(str)
    order = np.argsort(keys)
    east, north = np.array(_meta(db, "utm_east")), np.array(_meta(db, "utm_north"))
    assert np.array_equal(np.stack([east, north], 1)[order], vpr["db_utm"])  # the names' metres, exactly
    assert set(_meta(db, "utm_zone")) == {17} and set(_meta(db, "utm_letter")) == {"T"}
    heading = np.array(_meta(db, "heading_deg"))
    assert heading.dtype == np.float64 and ((heading >= 0) & (heading < 360)).all()
    assert set(_meta(db, "latlon_source")) == {"name", "utm"} and len(set(_meta(db, "capture_id"))) == 150
    assert set(_meta(vpr["q"], "timestamp")) <= {"2021-05-12T10:30:00", None}
    lat = st.latlon[:][:, 0]
    assert ((lat > 40.43) & (lat < 40.45)).all()


def _oracle_recall(vpr, out, ks=(1, 5, 10, 20)):
    """Brute force from the file names: positives within 25 m (inclusive) in UTM, hits by key."""
    db_keys = sorted(np.asarray(open_store(vpr["db"]).keys[:]).astype(str))
    q_keys = sorted(np.asarray(open_store(vpr["q"]).keys[:]).astype(str))
    d = np.hypot(*(vpr["q_utm"][:, None, :] - vpr["db_utm"][None, :, :]).transpose(2, 0, 1))
    positives = {q: {db_keys[j] for j in np.flatnonzero(d[i] <= 25.0)} for i, q in enumerate(q_keys)}
    t = pq.read_table(out).to_pydict()
    hits = np.array([[bool(set(top[:k]) & positives[key]) for k in ks] for key, top in zip(t["key"], t["topk_keys"])])
    answerable = np.array([bool(positives[key]) for key in t["key"]])
    return hits, answerable, np.array(t["answerable"]), positives


def test_retrieve_positives_utm_match_the_brute_force_oracle(vpr, tmp_path):
    out = str(tmp_path / "r.parquet")
    res = run_retrieve(RetrieveConfig(query=vpr["q"], database=vpr["db"], out=out, k=20, positives="utm", progress=False))
    hits, answerable, written, positives = _oracle_recall(vpr, out)
    assert res.recall["positives"] == "utm" and np.array_equal(written, answerable)
    assert res.recall["n"] == 55 and res.recall["n_unanswerable"] == int((~answerable).sum()) == 6
    q0 = [k for k in positives if "query000" in k][0]
    q1 = [k for k in positives if "query001" in k][0]
    assert len(positives[q0]) == 3 and not positives[q1]  # 25.00 m is a positive, 25.01 m is not
    for i, k in enumerate((1, 5, 10, 20)):
        assert res.recall["recall_all"][k] == pytest.approx(hits[:, i].mean(), abs=1e-12)
        assert res.recall["recall"][k] == pytest.approx(hits[answerable, i].mean(), abs=1e-12)
    auto = run_retrieve(RetrieveConfig(query=vpr["q"], database=vpr["db"], out=str(tmp_path / "a.parquet"), k=20, progress=False))
    assert auto.recall == res.recall


def test_vpr_eval_prints_recall_and_the_uncertainty_table(vpr, tmp_path):
    runner = CliRunner()
    bc = str(tmp_path / "bc")
    r = runner.invoke(cli, ["bayescap", "train", "--store", vpr["db"], "--out", bc, "--steps", "20", "--val-every", "10",
                            "--min-pairs", "20", "--method", "bayescap-cycle"])
    assert r.exit_code == 0, r.output
    assert "cosplace_classes" in r.output and "pairs: 150" in r.output  # 50 classes of 3 panoramas: 3 pairs each
    out = tmp_path / "ev"
    r = runner.invoke(cli, ["vpr-eval", "--database", vpr["db"], "--queries", vpr["q"], "--bayescap", bc, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "R@1: " in r.output and "R@20: " in r.output and "(UTM 25 m, all 55 queries)" in r.output
    assert "answerable only (49; 6 without a positive)" in r.output
    for score in ("u_dist1", "u_ratio12", "u_spread_km", "u_geo_inconsistency", "bayescap-cycle log_u", "bayescap-cycle log_u_epi"):
        assert f"  {score} " in r.output
    doc = json.loads((out / "report.json").read_text())
    rows = {row["score"]: row for row in doc["uncertainty"]}
    assert doc["recall"]["positives"] == "utm" and rows["u_dist1"]["n"] == 49
    assert rows["u_dist1"]["aurg"] > 0 and rows["u_dist1"]["auroc"] > 0.6  # distance to the top-1 flags the swapped places
    assert sorted(p.name for p in out.glob("*.png")) == ["reliability_correctat1_25_m__UTM.png", "sparsification_correctat1_25_m__UTM.png"]


def test_positives_utm_without_utm_metadata_is_one_line(vpr, tmp_path, demo_stores):
    r = CliRunner().invoke(cli, ["retrieve", "--query", demo_stores["test"], "--database", demo_stores["train"],
                                 "-o", str(tmp_path / "x.parquet"), "--positives", "utm"])
    assert r.exit_code == 1 and "no UTM metadata" in r.output and "--labels vpr-name" in r.output

"""Retrieval and BayesCap benchmarks at toy sizes: figures present, blocked = bare neighbours."""

from geopipe.stages.bench_retrieval import bench_bayescap, bench_retrieval, generate_database


def test_bench_retrieval_small():
    r = bench_retrieval(db_rows=3000, dim=16, queries=20, k=5, chunk_rows=700, repeats=1)
    assert r["top1_agreement_blocked_bare"] == 1.0 and r["blocked_queries_per_s"] > 0 and r["peak_rss_mb_blocked"] > 0
    db = generate_database(10, 4)
    assert db.dtype.name == "float16" and abs(float((db.astype("float32") ** 2).sum(1).mean()) - 1) < 1e-2


def test_bench_bayescap_small():
    r = bench_bayescap(n_pairs=200, dim=16, score_records=50, mc_passes=3)
    assert r["steps"] == 3 and r["train_seconds"] > 0 and r["score_records_per_s"] > 0


def test_bench_retrieval_queries_small(tmp_path):
    from geopipe.stages.bench_retrieval import bench_retrieval_queries

    r = bench_retrieval_queries(str(tmp_path), queries=(20, 60), db_rows=500, dim=8, k=4, modes=("top1",), threads=1,
                                clusters=20)
    assert [p["queries"] for p in r["points"]] == [20, 60]
    for p in r["points"]:
        assert p["top1"]["peak_rss_mb"] > 0 and p["top1"]["queries_per_s"] > 0 and p["bare"]["seconds"] > 0
        assert p["top1"]["recall_at_1"] > 0.5  # clustered records: the nearest one is mostly of the query's place
    assert "top1" in r["rss_spread"] and (tmp_path / "retrieval-top1-60.parquet").exists()

"""The scale benchmarks run end to end on tiny inputs and report their figures (real LocalCluster,
real spawned processes); the numbers themselves are the README's, measured at full size."""

from geopipe.stages.bench_scale import ScaleBenchConfig, bench_dask_predict, bench_import


def test_dask_and_import_benchmarks_report_their_figures(tmp_path):
    cfg = ScaleBenchConfig(workdir=str(tmp_path), dim=16, chunk_rows=64, net_dim=16, depth=1, predict_rows=256, predict_steps=1,
                           import_rows=300, import_dim=16)
    dask = bench_dask_predict(cfg)
    assert dask["records"] == 256 and len(dask["in_process_s"]) == 2
    assert dask["dask_running_cluster_worker_cpu_s"] > 0 and dask["cluster_start_stop_s"] > 0
    imp = bench_import(cfg)
    assert imp["rows"] == 300 and imp["import_s"] > 0 and imp["import_peak_rss_mb"] > imp["import_rss_growth_mb"] >= 0

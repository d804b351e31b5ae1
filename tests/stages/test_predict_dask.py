"""geopipe predict: Dask workers write the parts of a Parquet dataset (real LocalCluster, 2 workers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.artifacts.predictions import list_parts, read_predictions
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.predict import PredictConfig, partition_bounds, run_predict
from geopipe.stages.train import TrainConfig, run_train

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 8, "preprocess": {"size": 8}, "fingerprint": "abc"}
N = 480
SLOW_STEPS = 100  # sampling steps that make a partition last long enough to kill its worker mid-run


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("dask_predict")
    store = str(root / "s.zarr")
    rng = np.random.default_rng(0)
    ll = np.column_stack([rng.uniform(-60, 60, N), rng.uniform(-170, 170, N)])
    emb = np.concatenate([ll / 90, rng.normal(size=(N, 6))], axis=1)
    with StoreWriter.open(store, backbone=IDENTITY, embed_dim=8, dtype="float32", chunk_rows=32) as w:
        for s in range(0, N, 160):
            w.append_shard(f"s{s}.tar", emb[s : s + 160], ll[s : s + 160], [f"k{i}" for i in range(s, s + 160)], {}, [],
                           ShardStat(1, 1.0))
    ckpt = str(root / "m")
    run_train(TrainConfig(store=store, out=ckpt, dim=16, depth=1, expansion=2, steps=4, warmup=1, batch_size=32, val_every=4,
                          device="cpu", progress=False, stream=False))
    return {"store": store, "ckpt": ckpt}


def _cfg(model, out, **kw):
    opts = dict(checkpoint=model["ckpt"], store=model["store"], out=str(out), steps=3, batch_size=16, device="cpu", progress=False)
    opts.update(kw)
    return PredictConfig(**opts)


def test_partitions_follow_chunks_and_always_split_small_stores():
    assert partition_bounds(100_000, 4096, 4096, 8, 16) == [(s, min(100_000, s + 8192)) for s in range(0, 100_000, 8192)]
    assert len(partition_bounds(10, 4096, 4096, 8, 4)) == 4  # a store smaller than a chunk still feeds 4 workers
    assert partition_bounds(3, 4096, 4096, 8, 16) == [(0, 1), (1, 2), (2, 3)]
    assert partition_bounds(0, 4096, 4096, 8, 16) == []


def test_dask_dataset_equals_in_process_row_for_row(model, tmp_path):
    ref = run_predict(_cfg(model, tmp_path / "ref.parquet"))
    res = run_predict(_cfg(model, tmp_path / "out.parquet", dask="local:2"))
    assert os.path.isdir(res.out) and res.parts_written == 16 and res.parts_skipped == 0
    a = pq.read_table(ref.out)
    b = pq.read_table(res.out)  # pyarrow reads the directory as one table, parts in row order
    assert b.num_rows == N and b.column("key").to_pylist() == a.column("key").to_pylist()
    for name in ("lat", "lon", "true_lat", "distance_km"):
        assert b.column(name).to_pylist() == a.column(name).to_pylist(), name  # identical numbers, not close ones
    assert b.schema.metadata[b"geopipe"] == pq.read_schema(os.path.join(res.out, "_common_metadata")).metadata[b"geopipe"]
    assert b"geo" in pq.read_schema(os.path.join(res.out, "_metadata")).metadata
    md = pq.read_metadata(os.path.join(res.out, "_metadata"))
    assert md.num_rows == N and md.num_row_groups == 16
    # the client received footers only: under one partition's table
    smallest = min(pq.read_table(os.path.join(res.out, n)).nbytes for n in list_parts(res.out).values())
    assert 0 < res.largest_reply_bytes < smallest
    # other readers see one table
    import pandas as pd

    assert pd.read_parquet(res.out)["key"].tolist() == a.column("key").to_pylist()
    gpd = pytest.importorskip("geopandas")
    gdf = gpd.read_parquet(res.out)
    assert len(gdf) == N and gdf.geometry.x.tolist() == a.column("lon").to_pylist()
    cols, meta = read_predictions(res.out)
    assert cols["key"] == a.column("key").to_pylist() and meta["config"]["dask"] == "local:2"
    try:
        import duckdb
    except ImportError:
        return
    assert duckdb.sql(f"select count(*) from read_parquet('{res.out}/*.parquet')").fetchall()[0][0] == N


def test_rerun_skips_written_parts_and_refuses_foreign_ones(model, tmp_path):
    out = tmp_path / "ds"
    first = run_predict(_cfg(model, out))
    assert first.parts_written == 16
    victims = sorted(list_parts(str(out)).values())[3:6]
    for name in victims:
        os.remove(out / name)
    os.remove(out / "_metadata")
    with pytest.raises(GeopipeError, match="incomplete"):
        read_predictions(str(out))
    again = run_predict(_cfg(model, out))
    assert (again.parts_written, again.parts_skipped) == (3, 13)
    keys = pq.read_table(out).column("key").to_pylist()
    assert keys == [f"k{i}" for i in range(N)]
    with pytest.raises(GeopipeError, match="other predictions"):
        run_predict(_cfg(model, out, steps=4))
    from geopipe.stages.evaluate import EvaluateConfig, run_evaluate

    ev = run_evaluate(EvaluateConfig(predictions=(str(out), str(first.out)), names=("a", "b")))
    assert ev.reports[0]["distance"]["n"] == N and ev.reports[0]["distance"] == ev.reports[1]["distance"]


_KILL_SCRIPT = """
import json, os, signal, sys, threading, time
from dask.distributed import Client, LocalCluster
from geopipe.pipeline.artifacts.predictions import list_parts
from geopipe.stages.predict import PredictConfig, run_predict

ckpt, store, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
    with Client(cluster) as client:  # closed before predict opens its own client
        pids = sorted(client.run(os.getpid).values())
    seen = {}

    def kill_when_first_part_lands():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list_parts(out):
            time.sleep(0.005)
        seen["parts"] = len(list_parts(out))
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_when_first_part_lands)
    killer.start()
    res = run_predict(PredictConfig(checkpoint=ckpt, store=store, out=out, steps=steps, batch_size=16, device="cpu",
                                    progress=False, min_partitions=40, dask=cluster.scheduler_address))
    killer.join()
print(json.dumps({"seen": seen["parts"], "written": res.parts_written}))
"""


def test_a_worker_killed_mid_run_still_yields_a_complete_dataset(model, tmp_path):
    # In its own process: a second Dask client in the test session's process can trip over the
    # event loop of an earlier one ("bound to a different event loop"), which is not what is tested.
    out = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, model["ckpt"], model["store"], str(out), str(SLOW_STEPS)],
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0 < got["seen"] < 40  # killed while work was left
    table = pq.read_table(out)
    keys = table.column("key").to_pylist()
    assert keys == [f"k{i}" for i in range(N)] and got["written"] == len(list_parts(str(out)))
    ref = run_predict(_cfg(model, tmp_path / "ref.parquet", steps=SLOW_STEPS, min_partitions=40))
    assert table.column("lat").to_pylist() == pq.read_table(ref.out).column("lat").to_pylist()


def test_cli_local_cluster_shuts_down_quietly(model, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "geopipe", "predict", "-c", model["ckpt"], "--store", model["store"], "-o", str(out),
           "--steps", "2", "--batch-size", "64", "--device", "cpu", "--dask", "local:2"]
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "predicted 480 records" in r.stdout
    noise = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("predict")]  # progress lines
    assert not noise, "\n".join(noise)
    assert pa.concat_tables([pq.read_table(out)]).num_rows == N

"""Dask worker processes are tuned for torch: a LocalCluster's workers start without Dask's
MALLOC_TRIM_THRESHOLD_ and with cores // N BLAS threads; any other worker undoes the small
trim threshold once per process (real LocalCluster, real subprocesses)."""

import os
import subprocess
import sys

from geopipe.pipeline.core.parallel import dask_client, local_worker_environ, map_partitions


def _environ(_i=None):
    from geopipe.pipeline.core.parallel import tune_worker_process

    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS"), tune_worker_process()


def test_local_workers_start_without_the_trim_threshold_and_with_their_share_of_cores():
    cores = len(os.sched_getaffinity(0))
    assert local_worker_environ(2)["OMP_NUM_THREADS"] == max(1, cores // 2)
    assert local_worker_environ(10 * cores)["OMP_NUM_THREADS"] == 1
    with dask_client("local:1") as client:
        (trim, omp, tuned), = client.run(_environ).values()
    assert trim is None and tuned is False
    assert omp == os.environ.get("OMP_NUM_THREADS", str(cores))  # a variable set here is passed on (Dask's rule)
    assert map_partitions(_environ, [(0,), (1,)], None)[0][2] is False  # in process: nothing to undo


def test_a_worker_started_with_dasks_trim_threshold_restores_glibcs_thresholds_once():
    code = "from geopipe.pipeline.core.parallel import tune_worker_process as t; print(t(), t())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    small = subprocess.run([sys.executable, "-c", code], env={**env, "MALLOC_TRIM_THRESHOLD_": "65536"}, capture_output=True, text=True)
    unset = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert small.stdout.split() == ["True", "True"], small.stderr
    assert unset.stdout.split() == ["False", "False"], unset.stderr

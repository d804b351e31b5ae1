"""Shared fixtures: a small demo world extracted once per session with the tiny backbone."""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
# Prefect runs on its ephemeral local server with a throw-away home (SQLite) per session,
# removed at exit: registered before Prefect's own exit hooks, it runs after they stop the server.
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="geopipe-prefect-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def pytest_configure(config):
    """One torch thread per process: the suite's models are tiny, and DataLoader/Dask workers
    share the CI machine's two cores, where spinning OpenMP threads oversubscribe badly."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Everything under tests/e2e/ carries the ``e2e`` marker (``make test`` runs it all)."""
    for item in items:
        if "/tests/e2e/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def demo_world(tmp_path_factory):
    """Shards of a small demo world: {"dir", "train": pattern, "test": pattern}."""
    from geopipe.pipeline.world.demo_world import DemoWorldConfig, write_demo_world

    out = tmp_path_factory.mktemp("demo_world")
    write_demo_world(str(out), DemoWorldConfig(n_train=400, n_test=80, shard_size=200, seed=0))
    return {"dir": out, "train": str(out / "train-{000000..000001}.tar"), "test": str(out / "test-000000.tar")}


@pytest.fixture(scope="session")
def demo_stores(demo_world, tmp_path_factory):
    """Extracted train/test stores of :func:`demo_world`: {"train": path, "test": path}."""
    from geopipe.stages.extract import ExtractConfig, run_extract

    out = tmp_path_factory.mktemp("stores")
    stores = {}
    for split in ("train", "test"):
        path = str(out / f"{split}.zarr")
        run_extract(ExtractConfig(shards=(demo_world[split],), store=path, num_workers=0, batch_size=128, progress=False))
        stores[split] = path
    return stores


def pytest_unconfigure(config):
    """Prefect stops its ephemeral server at interpreter exit and logs that at INFO through a
    console handler bound to pytest's capture stream, closed by then ("--- Logging error ---");
    only warnings and errors are worth printing that late."""
    import logging

    logging.getLogger("prefect").setLevel(logging.WARNING)

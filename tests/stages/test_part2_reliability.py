"""Regression tests of part 2's commands fed unusual but valid inputs: a -k far beyond the
database, output urls, an empty query store, a checkpoint of the other kind."""

from __future__ import annotations

import numpy as np
import pytest

from geopipe.pipeline.artifacts.predictions import read_predictions
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.inspect import InspectConfig, run_inspect
from geopipe.stages.retrieve import RetrieveConfig, run_retrieve


def _store(path, n: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with StoreWriter.open(str(path), backbone={"name": "t", "pretrained": None}, embed_dim=8, dtype="float32") as w:
        if n:
            ll = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-170, 170, n)])
            w.append_shard("a.tar", rng.normal(size=(n, 8)), ll, [f"s{seed}_{i}" for i in range(n)], {}, [], ShardStat(1, 0.0))
    return str(path)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("part2_rel")
    return {"q": _store(root / "q.zarr", 6, 1), "db": _store(root / "db.zarr", 20, 2), "empty": _store(root / "e.zarr", 0),
            "root": root}


def test_a_huge_k_is_clamped_to_the_database_not_allocated(stores):
    """Before: -k 10**12 allocated a (queries, k) array (numpy MemoryError traceback). After: k = database rows."""
    out = stores["root"] / "huge.parquet"
    res = run_retrieve(RetrieveConfig(query=stores["q"], database=stores["db"], out=str(out), k=10**12, progress=False))
    cols, meta = read_predictions(str(out))
    assert res.n_queries == 6 and meta["model"]["k"] == 20
    import pyarrow.parquet as pq

    assert {len(v) for v in pq.read_table(out, columns=["topk_keys"]).column("topk_keys").to_pylist()} == {20}
    res = run_inspect(InspectConfig(store=stores["db"], out_dir=str(stores["root"] / "insp"), k=10**11, clusters=2, n_iter=1,
                                    n_probes=2, progress=False))
    assert (stores["root"] / "insp" / "galleries.parquet").exists()


def test_output_urls_are_written_through_fsspec(stores):
    """Before: -o file:///abs/p.parquet wrote a local folder named 'file:' under the working directory, and
    memory:// likewise. After: file:// is the local path, other urls go through fsspec."""
    local = stores["root"] / "url.parquet"
    run_retrieve(RetrieveConfig(query=stores["q"], database=stores["db"], out=f"file://{local}", k=3, progress=False))
    assert local.is_file() and read_predictions(str(local))[0]["key"][0] == "s1_0"
    run_retrieve(RetrieveConfig(query=stores["q"], database=stores["db"], out="memory://geopipe-test/r.parquet", k=3, progress=False))
    assert len(read_predictions("memory://geopipe-test/r.parquet")[0]["key"]) == 6


def test_empty_query_store_is_named_as_empty(stores):
    """Before: an empty query store was reported as 'embedded by different backbones'."""
    with pytest.raises(GeopipeError, match="query store .* has no records"):
        run_retrieve(RetrieveConfig(query=stores["empty"], database=stores["db"], out=str(stores["root"] / "x.parquet"), progress=False))


def test_an_empty_store_being_written_names_its_writer(stores, tmp_path):
    """Before: a store still being created by an extract read as 'has no records; extract or import some first'."""
    import os
    import socket
    import subprocess
    import sys

    from geopipe.pipeline.core.lockfile import DirLock

    out = str(stores["root"] / "w.parquet")
    with DirLock(str(stores["empty"])):  # this process is the writer
        with pytest.raises(GeopipeError, match=f"has no records; it is being written by process {os.getpid()} on "
                                               f"{socket.gethostname()} right now: wait for that run to finish"):
            run_retrieve(RetrieveConfig(query=stores["empty"], database=stores["db"], out=out, progress=False))
    # a lock file left by a writer that is gone (its pid exited) names nobody
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    lock = os.path.join(str(stores["empty"]), ".lock")
    with open(lock, "w") as fh:
        fh.write(f"{dead} {socket.gethostname()}\n")
    try:
        with pytest.raises(GeopipeError, match="has no records; extract or import some first"):
            run_retrieve(RetrieveConfig(query=stores["empty"], database=stores["db"], out=out, progress=False))
    finally:
        os.remove(lock)


@pytest.mark.parametrize("table,key,value,message", [
    ("retrieve", "k", 0, r"^\[uncertainty\.retrieve\] -k must be at least 1"),
    ("retrieve", "radius_m", -1.0, r"^\[uncertainty\.retrieve\] retrieve: --radius-m must be"),
    ("bayescap", "steps", 0, r"^\[uncertainty\.bayescap\] bayescap-cycle: --steps must be an integer in \[1, 1,000,000,000\], got 0$"),
    ("bayescap", "lr", float("nan"), r"^\[uncertainty\.bayescap\] bayescap-cycle: --lr must be"),
    ("evaluate", "failure_km", -3.0, r"^\[uncertainty\.evaluate\] evaluate: --failure-km must be"),
])
def test_uncertainty_tables_out_of_range_name_their_table(table, key, value, message):
    """Before: BayesCap values out of range passed the config (steps = 0 trained nothing and saved it) and the
    retrieve/evaluate ones did not say which TOML table held them. After: one line naming the table."""
    from geopipe.stages.config import parse_pipeline_config

    doc = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet"}, "bayescap": {"store": "q.zarr", "out": "bc"},
                           "evaluate": {}}}
    doc["uncertainty"][table][key] = value
    with pytest.raises(GeopipeError, match=message):
        parse_pipeline_config(doc)


def test_split_table_out_of_range():
    from geopipe.stages.config import parse_pipeline_config

    doc = {"uncertainty": {"retrieve": {"query": "q.zarr", "out": "r.parquet", "split": {"mode": "blocks", "block_m": 0.0}}}}
    with pytest.raises(GeopipeError, match=r"^\[uncertainty\.retrieve\.split\] split block_m \(--block-m\) must be"):
        parse_pipeline_config(doc)


@pytest.fixture(scope="module")
def dataset(stores):
    """A predictions dataset directory of three parts (as `predict --dask` writes them)."""
    import pyarrow.parquet as pq

    from geopipe.pipeline.artifacts.dataset import finish_dataset, write_part

    single = stores["root"] / "single.parquet"
    run_retrieve(RetrieveConfig(query=stores["db"], database=stores["q"], out=str(single), k=2, progress=False))
    table = pq.read_table(single)
    ds = stores["root"] / "ds"
    parts = [write_part(table.slice(a, b - a), str(ds), a, b, table.schema.metadata) for a, b in ((0, 7), (7, 14), (14, 20))]
    finish_dataset(str(ds), parts, table.schema.metadata)
    return ds


def test_a_missing_or_damaged_part_is_one_line(dataset, tmp_path):
    """Before: FileNotFoundError / ArrowInvalid tracebacks from evaluate (and --uncertainty). After: one line naming the part."""
    import shutil

    assert len(read_predictions(str(dataset))[0]["key"]) == 20
    gone, torn = tmp_path / "gone", tmp_path / "torn"
    shutil.copytree(dataset, gone)
    shutil.copytree(dataset, torn)
    part = sorted(p.name for p in dataset.glob("part-*.parquet"))[1]
    (gone / part).unlink()
    (torn / part).write_bytes((dataset / part).read_bytes()[:300])
    with pytest.raises(GeopipeError, match=f"part .*{part}' listed in its _metadata is missing"):
        read_predictions(str(gone))
    with pytest.raises(GeopipeError, match=f"part .*{part}' is damaged"):
        read_predictions(str(torn))
    from geopipe.pipeline.eval.failure import read_optional_columns

    with pytest.raises(GeopipeError, match="is missing"):
        read_optional_columns(str(gone), ["u_dist1"])


def test_a_failed_read_with_torch_loaded_exits_cleanly(dataset, tmp_path):
    """Before: Arrow tables read through a Python file object and kept alive by the error (as the CLI
    keeps it while it exits) made the interpreter abort at exit with torch imported (exit 134,
    'terminate called without an active exception') in about one run of four."""
    import shutil
    import subprocess
    import sys

    gone = tmp_path / "gone"
    shutil.copytree(dataset, gone)
    sorted(gone.glob("part-*.parquet"))[-1].unlink()
    code = ("import torch\nfrom geopipe.pipeline.artifacts.predictions import read_predictions\n"
            f"try:\n    read_predictions({str(gone)!r})\nexcept Exception as exc:\n    err = exc\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    codes = [(p.wait(timeout=120), p.stderr.read().decode()[-200:]) for p in procs]
    assert all(rc == 0 for rc, _ in codes), codes
    import pyarrow as pa

    from geopipe.pipeline.artifacts.predictions import _open_parquet

    with _open_parquet(f"file://{gone / '_metadata'}") as fh:  # the deterministic half: local files are Arrow's own
        assert isinstance(fh, pa.NativeFile)

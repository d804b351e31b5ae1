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


@pytest.mark.parametrize("table,key,value,message", [
    ("retrieve", "k", 0, r"^\[uncertainty\.retrieve\] -k must be at least 1"),
    ("retrieve", "radius_m", -1.0, r"^\[uncertainty\.retrieve\] retrieve: --radius-m must be"),
    ("bayescap", "steps", 0, r"^\[uncertainty\.bayescap\] bayescap-cycle: --steps must be an integer >= 1, got 0$"),
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

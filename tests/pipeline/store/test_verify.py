"""`geopipe store info|verify`: pipeline/store_tools.py, stages/store_tools.py, flows/cli_store.py."""

import shutil

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.rejects import Reject, write_rejects
from geopipe.pipeline.store.verify import store_info, verify_store
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.store_tools import StoreVerifyConfig, run_store_verify

D = 768  # CLIP ViT-L/14 width: float16 rounding of unit vectors must stay within the tolerance
IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": D, "preprocess": {}, "fingerprint": "f"}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "good.zarr"
    rng = np.random.default_rng(0)
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=D, dtype="float16", normalize=True) as w:
        for s, n in enumerate((40, 25)):
            ll = np.column_stack([rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)])
            rej = [Reject(f"bad{s}", f"s{s}.tar", "corrupt_image", "x")] * (s + 1)
            w.append_shard(f"s{s}.tar", rng.normal(size=(n, D)), ll, [f"k{s}_{i}" for i in range(n)],
                           {"city": ['"c"'] * n}, rej, ShardStat(10, 1.0))
    return path


def _broken(good_store, tmp_path, edit):
    path = tmp_path / "broken.zarr"
    shutil.copytree(good_store, path)
    edit(zarr.open_group(str(path), mode="r+"), path)
    return str(path)


def test_good_store_info_and_verify(good_store):
    assert verify_store(str(good_store)) == []
    info = store_info(str(good_store))
    assert (info.rows, info.embed_dim, info.dtype, info.shards, info.rejects) == (65, D, "float16", 2, {"corrupt_image": 3})
    assert info.size_bytes > 65 * D  # compressed random float16 embeddings dominate
    text = "\n".join(info.lines())
    assert "rows: 65" in text and "rejects: 3 (corrupt_image: 3)" in text and "schema: geopipe.store/1" in text
    assert "backbone: fake" in text and "shards done: 2" in text and "meta fields: city" in text


def _set_attr(g, **changes):
    g.update_attributes({**dict(g.attrs), **changes})


def _nan_row(g, _):
    g["embeddings"][3] = np.full(D, np.nan, dtype=np.float16)


def _long_row(g, _):
    g["embeddings"][5] = g["embeddings"][5] * 2


def _bad_lat(g, _):
    g["latlon"][7] = [95.0, 0.0]


def _dup_key(g, _):
    g["keys"][41] = "k0_0"


def _gap(g, _):
    shards = dict(g.attrs["shards"])
    shards["s1.tar"] = {**shards["s1.tar"], "start": 41}
    _set_attr(g, shards=shards)


def _short(g, _):
    g["keys"].resize((60,))


def _wrong_shard(g, _):
    g["shard"][0] = 1


def _fingerprint(g, _):
    _set_attr(g, fingerprint="0" * 64)


def _no_part(g, path):
    (path / "rejects" / "part-000001.parquet").unlink()


def _stale(g, path):
    write_rejects(str(path / "rejects" / "rejects.parquet"), [])


# Edits through zarr (valid encodings) change the chunk's bytes too: found by the digests before decoding.
_CHANGED = "%s, chunk c/0/0, rows [0, 65), shard 0, 1: its bytes"


@pytest.mark.parametrize("edit,expected", [
    (_nan_row, ["shard 0 (s0.tar): 1 non-finite embeddings (rows 3)", "shard 0 (s0.tar): rows differ from the digest", _CHANGED % "embeddings"]),
    (_long_row, ["shard 0 (s0.tar): 1 embeddings are not unit-norm (rows 5)", "shard 0 (s0.tar): rows differ", _CHANGED % "embeddings"]),
    (_bad_lat, ["shard 0 (s0.tar): 1 coordinates outside lat [-90, 90], lon [-180, 180) (rows 7)", "shard 0 (s0.tar): rows differ",
                _CHANGED % "latlon"]),
    (_dup_key, ["shard 1 (s1.tar): rows differ", "shard 1 (s1.tar): meta/keys differs from keys on rows [40, 65)",
                "1 repeated keys: 'k0_0'", "keys, chunk c/0, rows [0, 65), shard 0, 1: its bytes"]),
    (_gap, ["shard records are not contiguous at index 1"]),
    (_short, ["array 'keys' has 60 rows < attrs rows 65"]),
    (_wrong_shard, ["shard 0 (s0.tar): the shard array is not 0 on rows [0, 40)", "shard, chunk c/0, rows [0, 65), shard 0, 1: its bytes"]),
    (_fingerprint, ["attrs fingerprint does not match the chain of shard digests"]),
    (_no_part, ["shard 1 (s1.tar): rejects part", "attrs rejects {'corrupt_image': 3} differ from the rejects parts {'corrupt_image': 1}",
                "rejects/rejects.parquet is stale"]),
    (_stale, ["rejects/rejects.parquet is stale (0 rows, parts hold 3)"]),
], ids=lambda v: getattr(v, "__name__", ""))
def test_verify_finds_each_problem(good_store, tmp_path, edit, expected):
    problems = verify_store(_broken(good_store, tmp_path, edit))
    assert len(problems) == len(expected), problems
    for got, want in zip(problems, expected):
        assert got.startswith(want), (got, want)


def test_cli_info_and_verify_exit_codes(good_store, tmp_path):
    runner = CliRunner()
    out = runner.invoke(cli, ["store", "info", str(good_store)])
    assert out.exit_code == 0 and "rows: 65" in out.output
    out = runner.invoke(cli, ["store", "verify", str(good_store)])
    assert out.exit_code == 0 and out.output.startswith(f"{good_store}: OK")
    broken = _broken(good_store, tmp_path, _bad_lat)
    out = runner.invoke(cli, ["store", "verify", broken])
    assert out.exit_code == 1
    assert out.output.splitlines()[:2] == [f"{broken}: 3 problem(s)", "  - shard 0 (s0.tar): 1 coordinates outside "
                                           "lat [-90, 90], lon [-180, 180) (rows 7)"]
    out = runner.invoke(cli, ["store", "info", str(tmp_path / "nope")])
    assert out.exit_code == 1 and out.output.startswith("geopipe: error: not a geopipe embedding store")
    res = run_store_verify(StoreVerifyConfig(store=str(tmp_path / "nope")))
    assert not res.ok and "not a geopipe embedding store" in res.problems[0]

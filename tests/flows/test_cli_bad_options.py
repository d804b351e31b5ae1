"""Every command fed a table of bad options and inputs: exit status 1, one line
(`geopipe: error: ...`), no traceback. Values pass click's own type conversion: what is checked
is geopipe's validation (config dataclasses, inputs on disk)."""

from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A real store, a trained checkpoint, a predictions file, a file and a directory."""
    root = tmp_path_factory.mktemp("bad_options")
    rng = np.random.default_rng(0)
    store = root / "s.zarr"
    with StoreWriter.open(str(store), backbone={"name": "t", "pretrained": None}, embed_dim=8, dtype="float32") as w:
        ll = np.column_stack([rng.uniform(-80, 80, 64), rng.uniform(-170, 170, 64)])
        w.append_shard("a.tar", rng.normal(size=(64, 8)), ll, [f"k{i}" for i in range(64)], {}, [], ShardStat(1, 0.0))
    model = root / "m"
    res = CliRunner().invoke(cli, ["train", "--store", str(store), "-o", str(model), "--dim", "16", "--depth", "1", "--steps", "4",
                                   "--warmup", "1", "--batch-size", "16", "--val-every", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    bayescap = root / "bc"  # too few pairs in a 64-record store: identity pairs (trains in a second)
    res = CliRunner().invoke(cli, ["bayescap", "train", "--store", str(store), "-o", str(bayescap), "--method", "bayescap", "--steps", "2",
                                   "--batch-size", "8", "--val-every", "2", "--no-pairs-policy", "identity"])
    assert res.exit_code == 0, res.output
    preds = root / "p.parquet"
    res = CliRunner().invoke(cli, ["predict", "-c", str(model), "--store", str(store), "-o", str(preds), "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    table = pq.read_table(preds)  # a predictions file with lat = 999 on its first row
    lat = pa.array([999.0] + table.column("lat").to_pylist()[1:])
    pq.write_table(table.set_column(table.schema.get_field_index("lat"), "lat", lat), root / "bad_lat.parquet")
    (root / "file").write_text("x")
    (root / "dir").mkdir()
    (root / "dir.parquet").mkdir()
    return {"store": str(store), "model": str(model), "bayescap": str(bayescap), "preds": str(preds), "bad_lat": str(root / "bad_lat.parquet"),
            "file": str(root / "file"), "dir": str(root / "dir"), "missing": str(root / "missing"), "root": root,
            **_hostile(root, store, model, preds)}


def _hostile(root, store, model, preds) -> dict:
    """Damaged and hostile inputs (issue 22): a store whose meta/country chunk has 16 zeroed bytes,
    an older store (no chunk digests) with NaN embeddings, checkpoints whose config.json has
    condition.mean = "oops" or is nested 100,000 deep, a binary and a deeply nested TOML,
    retrieval predictions with uncertainty scores (for --plots)."""
    import json
    import shutil

    rng = np.random.default_rng(1)
    meta = root / "meta.zarr"
    with StoreWriter.open(str(meta), backbone={"name": "t", "pretrained": None}, embed_dim=8, dtype="float32") as w:
        ll = np.column_stack([rng.uniform(-80, 80, 64), rng.uniform(-170, 170, 64)])
        w.append_shard("a.tar", rng.normal(size=(64, 8)), ll, [f"k{i}" for i in range(64)],
                       {"country": [json.dumps("FR" if i % 2 else "DE") for i in range(64)]}, [], ShardStat(1, 0.0))
    chunk = next(p for p in (meta / "meta" / "country").rglob("*") if p.is_file() and p.name != "zarr.json")
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2: len(data) // 2 + 16] = bytes(16)
    chunk.write_bytes(bytes(data))
    nan = root / "nan.zarr"  # a store written before chunk digests, with 5 NaN embeddings
    shutil.copytree(store, nan)
    doc = json.loads((nan / "zarr.json").read_text())
    doc["attributes"].pop("chunk_digests", None)
    (nan / "zarr.json").write_text(json.dumps(doc))
    import zarr

    emb = zarr.open_group(str(nan), mode="r+")["embeddings"]
    values = emb[:]
    values[3:8] = np.nan
    emb[:] = values
    oops, deep = root / "m_oops", root / "m_deep"
    for path in (oops, deep):
        shutil.copytree(model, path)
    cfg = json.loads((oops / "config.json").read_text())
    cfg["condition"]["mean"] = "oops"
    (oops / "config.json").write_text(json.dumps(cfg))
    (deep / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    (root / "binary.toml").write_bytes(bytes(range(256)) * 8)
    (root / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000)
    (root / "ok.toml").write_text(  # a valid pipeline config: only the schedule is wrong in the serve rows
        f'[extract.t]\nshards = ["{root}/none-*.tar"]\nstore = "{root}/x.zarr"\n[train]\nstore = "{root}/x.zarr"\nout = "{root}/xm"\n'
        f'[predict]\ncheckpoint = "{root}/xm"\nstore = "{root}/x.zarr"\nout = "{root}/xp.parquet"\n'
        f'[evaluate]\npredictions = ["{root}/xp.parquet"]\n')
    scored = root / "scored.parquet"
    res = CliRunner().invoke(cli, ["retrieve", "--query", str(store), "--split", "leave_one_out", "-o", str(scored), "--mode", "kernel",
                                   "--bayescap", str(root / "bc")])
    assert res.exit_code == 0, res.output
    from samples import good_sample

    from geopipe.pipeline.ingest.shards import write_shards

    (tar,) = write_shards(root / "shards", [good_sample(f"g{i}", i) for i in range(3)], "g", 3)
    return {"tar": tar, "meta_store": str(meta), "nan_store": str(nan), "oops": str(oops), "deep": str(deep), "binary_toml": str(root / "binary.toml"),
            "deep_toml": str(root / "deep.toml"), "ok_toml": str(root / "ok.toml"), "scored": str(scored)}


TRAIN = ["--dim", "16", "--depth", "1", "--steps", "4", "--warmup", "1", "--batch-size", "16", "--device", "cpu"]

CASES = {
    "train": [
        ["--steps", "0"], ["--batch-size", "0"], ["--warmup", "9"], ["--dim", "12"], ["--depth", "0"], ["--lr", "-1"],
        ["--lr", "nan"], ["--ema-decay", "2"], ["--weight-decay", "-1"], ["--val-every", "0"], ["--device", "bogus"],
        ["--out", "{file}"], ["--store", "{missing}"], ["--store", "{file}"], ["--out", "{bayescap}"],
    ],
    "predict": [
        ["--samples", "-1"], ["--ensemble", "-2"], ["--localizability", "-1"], ["--rtol", "-1"], ["--atol", "0"],
        ["--guidance", "nan"], ["--guidance", "inf"], ["--steps", "0"], ["--batch-size", "0"], ["--device", "bogus"],
        ["--dask", "local:0"], ["--dask", "bogus:1"], ["--dask", "host:abc"], ["--dask", "nonsense"], ["-o", "{dir}.parquet"], ["-o", "{file}"],
        ["--checkpoint", "{missing}"], ["--checkpoint", "{file}"], ["--store", "{missing}"],
        ["--checkpoint", "{bayescap}"], ["--bayescap", "{model}"], ["--bayescap", "{bayescap}", "--mc-passes", "0"],
    ],
    "train-bayescap": [
        ["--steps", "0"], ["--batch-size", "0"], ["--lr", "-1"], ["--lr", "nan"], ["--val-every", "0"], ["--min-pairs", "-1"],
        ["--out", "{file}"], ["--store", "{missing}"], ["--out", "{model}"], ["--device", "bogus"],
    ],
    "evaluate": [["{bad_lat}"], ["{missing}"], ["{preds}", "--prdc-k", "0"], ["{preds}", "--prdc-chunks", "0"],
                 ["{preds}", "-o", "{dir}"], ["{preds}", "--name", "a", "--name", "b"], ["{file}"],
                 ["{preds}", "--uncertainty", "--failure-km", "nan"], ["{preds}", "--uncertainty", "--failure-km", "0"],
                 ["{preds}", "--uncertainty", "--plots", "{file}"]],
    "store": [["info", "{missing}"], ["repair", "{missing}"], ["info", "{file}"]],
    "extract": [["{missing}.tar", "--store", "{root}/e.zarr"], ["{missing}.tar", "--store", "{file}"]],
    "demo-data": [["{root}/d", "--n-train", "-1"], ["{root}/d", "--shard-size", "0"]],
    "import": [["{missing}.npy", "--store", "{root}/i.zarr", "--backbone-name", "x"],
               ["{missing}.npy", "--store", "{root}/i.zarr", "--backbone-name", "x", "--max-reject-fraction", "2"]],
    "map": [["-c", "{model}", "--store", "{store}", "-o", "{root}/maps", "--resolution", "7"],
            ["-c", "{model}", "--store", "{store}", "-o", "{root}/maps", "--n", "0"],
            ["-c", "{model}", "--store", "{store}", "-o", "{root}/maps", "--key", "nope"],
            ["-c", "{missing}", "--store", "{store}", "-o", "{root}/maps"],
            ["-c", "{bayescap}", "--store", "{store}", "-o", "{root}/maps"]],
    "calibration-plot": [["{missing}", "-o", "{root}/c.png"], ["{file}", "-o", "{root}/c.png"]],
    "retrieve": [["--query", "{store}", "--database", "{missing}", "-o", "{root}/r.parquet"],
                 ["--query", "{store}", "--database", "{store}", "-o", "{root}/r.parquet", "-k", "0"],
                 *[["--query", "{store}", "-o", "{root}/r.parquet", *bad] for bad in (
                     ["--split", "blocks", "--block-m", "0"], ["--split", "blocks", "--block-m", "nan"],
                     ["--split", "blocks", "--query-fraction", "2"], ["--split", "capture", "--query-fraction", "0"],
                     ["--split", "column", "--split-column", "nope"], ["--split", "leave_one_out", "--radius-m", "nan"],
                     ["--split", "leave_one_out", "--radius-m", "-1"], ["--split", "leave_one_out", "--bayescap", "{model}"],
                     ["--split", "leave_one_out", "--bayescap", "{bayescap}", "--mc-passes", "0"],
                     ["--database", "{file}"], ["--split", "leave_one_out", "-o", "{dir}"],
                     ["--split", "leave_one_out", "--device", "bogus"])]],
    "inspect": [["--store", "{store}", "-o", "{root}/insp", "--clusters", "2", "--iterations", "1", *bad] for bad in (
        ["--keys", "nope"], ["--direction", "nope=x"], ["-k", "0"], ["--clusters", "0"], ["--probe-fields", "nope"],
        ["--store", "{missing}"], ["--database", "{missing}"])],
    "bench": [["--what", "predict", "--dim", "12"], ["--what", "predict", "--batch", "0"], ["--device", "bogus"]],
    "run": [["{file}"], ["{binary_toml}"], ["{deep_toml}"]],
    "serve": [["{ok_toml}", *bad] for bad in (["--cron", "not a cron"], ["--cron", "61 25 * * *"], ["--interval", "0"],
                                              ["--interval", "-5"], ["--interval", "nan"], ["--cron", "0 3 * * *", "--interval", "60"])]
             + [["{binary_toml}", "--cron", "0 3 * * *"], ["{deep_toml}", "--interval", "60"]],
}
# issue 22: hostile inputs and outputs that cannot be created, each one line
PROC = "/proc/geopipe-x" if sys.platform.startswith("linux") else "{file}/proc"  # cannot be created; "{file}/x": a file in the way
CASES["train"] += [["--steps", str(10**20)], ["--out", f"{PROC}/m"], ["--out", "{file}/m"]]
CASES["predict"] += [["--steps", str(10**20)], ["--checkpoint", "{oops}"], ["--checkpoint", "{deep}"], ["-o", f"{PROC}/p.parquet"],
                     ["-o", f"{PROC}.parquet"], ["-o", f"{PROC}/ds"], ["-o", "{file}/p.parquet"]]
CASES["evaluate"] += [["{preds}", "--store", "{meta_store}", "--country-field", "country"], ["{preds}", "-o", f"{PROC}/r.json"],
                      ["{preds}", "-o", "{file}/r.json"], ["{scored}", "--uncertainty", "--plots", f"{PROC}/plots"],
                      ["{scored}", "--uncertainty", "--plots", "{file}/plots"]]
CASES["extract"] += [["{tar}", "--store", f"{PROC}/s.zarr", "--workers", "0"], ["{tar}", "--store", "{file}/s.zarr", "--workers", "0"]]
CASES["inspect"] += [["--store", "{store}", "-o", "{root}/insp", *bad] for bad in (
    ["--block-m", "-1"], ["--block-m", "nan"], ["--max-probe-records", "0"], ["--radius-m", "0"], ["--store", "{nan_store}"],
    ["-o", f"{PROC}/i"])]
CASES["retrieve"] += [["--query", "{store}", "--database", "{nan_store}", "-o", "{root}/r.parquet"],
                      ["--query", "{nan_store}", "--database", "{store}", "-o", "{root}/r.parquet"],
                      ["--query", "{store}", "--database", "{store}", "-o", f"{PROC}/r.parquet"],
                      ["--query", "{store}", "--database", "{store}", "-o", "{file}/r.parquet"]]
CASES["train-bayescap"] += [["--steps", str(10**20)]]


def _base(command: str, x: dict) -> list[str]:
    if command == "train":
        return ["train", "--store", x["store"], "--out", str(x["root"] / "fuzz_model"), *TRAIN]
    if command == "predict":
        return ["predict", "-c", x["model"], "--store", x["store"], "-o", str(x["root"] / "fuzz.parquet"), "--steps", "2", "--device", "cpu"]
    if command == "train-bayescap":
        return ["bayescap", "train", "--store", x["store"], "--out", str(x["root"] / "fuzz_bc"), "--method", "bayescap", "--steps", "2",
                "--batch-size", "8", "--no-pairs-policy", "identity"]
    return [command]


@pytest.mark.parametrize("command, bad", [(c, b) for c, rows in CASES.items() for b in rows],
                         ids=[f"{c}:{' '.join(b)}" for c, rows in CASES.items() for b in rows])
def test_bad_option_is_one_line_exit_1(inputs, command, bad):
    args = [a.format(**inputs) for a in _base(command, inputs) + bad]
    # a later occurrence of an option overrides the base value (click keeps the last one)
    res = CliRunner().invoke(cli, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and lines and lines[-1].startswith("geopipe: error: "), res.output
    assert len(lines) == 1, res.output


def test_run_with_a_failing_stage_is_one_line_naming_the_flow_run(tmp_path):
    """A real Prefect flow run whose extract fails: one line, the flow run's name, no traceback."""
    cfg = tmp_path / "run.toml"
    w = tmp_path / "w"
    cfg.write_text(f"""workdir = "{w}"
[extract.train]
shards = ["{tmp_path}/nope-{{000000..000001}}.tar"]
store = "{w}/train.zarr"
[train]
store = "{w}/train.zarr"
out = "{w}/model"
[predict]
checkpoint = "{w}/model"
store = "{w}/train.zarr"
out = "{w}/p.parquet"
[evaluate]
predictions = ["{w}/p.parquet"]
""")
    res = CliRunner().invoke(cli, ["run", str(cfg)])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("geopipe: error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"geopipe: error: shard not found: {tmp_path}/nope-000000.tar"), res.output
    assert " (flow run '" in errors[0] and errors[0].endswith("; full trace with `geopipe run --debug` or in the Prefect UI)")


def test_dask_specs_are_checked_before_anything_loads():
    from geopipe.pipeline.core.errors import GeopipeError
    from geopipe.pipeline.core.parallel import _check_reachable, parse_dask_spec

    assert parse_dask_spec("local:3") == ("local", 3) and parse_dask_spec("tcp://h:8786") == ("address", "tcp://h:8786")
    for bad in ("local:0", "local:-1", "local:x", "nonsense", "host:abc", "tcp://host:0", "tcp://:8786"):
        with pytest.raises(GeopipeError, match="--dask"):
            parse_dask_spec(bad)
    t0 = __import__("time").monotonic()
    for unreachable, why in (("bogus-host-name.invalid:1", "unknown host"), ("127.0.0.1:1", "no Dask scheduler at 127.0.0.1:1")):
        with pytest.raises(GeopipeError, match=why):
            _check_reachable(unreachable)
    assert __import__("time").monotonic() - t0 < 10  # no client connect timeout


@pytest.mark.parametrize("args, says", [
    (["inspect", "--store", "{nan_store}", "-o", "{root}/insp_nan", "--clusters", "2"], r"store .*nan.zarr: record 'k3': embedding has NaN \(\+4 more records\)"),
    (["retrieve", "--query", "{store}", "--database", "{nan_store}", "-o", "{root}/r_nan.parquet"], r"record 'k3': embedding has NaN"),
    (["retrieve", "--query", "{nan_store}", "--database", "{store}", "-o", "{root}/r_nan.parquet"], r"record 'k3': embedding has NaN"),
    (["evaluate", "{preds}", "--store", "{meta_store}", "--country-field", "country"], r"store .*meta.zarr: array meta/country, chunk .* is damaged"),
    (["predict", "-c", "{oops}", "--store", "{store}", "-o", "{root}/oops.parquet"], r"m_oops/config.json: condition must hold mean and std"),
    (["predict", "-c", "{deep}", "--store", "{store}", "-o", "{root}/deep.parquet"], r"m_deep/config.json is nested deeper than 64 levels"),
    (["run", "{deep_toml}"], r"pipeline config .*deep.toml is nested deeper than 64 levels"),
    (["train", "--store", "{store}", "-o", "{root}/m_steps", "--steps", str(10**20)], r"steps must be an integer in \[1, 1,000,000,000\]"),
    (["inspect", "--store", "{store}", "-o", "{root}/i", "--block-m", "-1"], r"--block-m must be a finite number >= 0 \(metres\), got -1.0"),
    (["inspect", "--store", "{store}", "-o", "{root}/i", "--max-probe-records", "0"], r"--max-probe-records must be an integer >= 1, got 0"),
])
def test_hostile_inputs_name_what_is_wrong(inputs, args, says):
    """Each drill case of issue 22 names the record, chunk, file or option at fault."""
    res = CliRunner().invoke(cli, [a.format(**inputs) for a in args])
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert re.search(says, res.output), res.output

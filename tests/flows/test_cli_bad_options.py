"""Every command fed a table of bad options and inputs: exit status 1, one line
(`geopipe: error: ...`), no traceback. Values pass click's own type conversion: what is checked
is geopipe's validation (config dataclasses, inputs on disk)."""

from __future__ import annotations

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
            "file": str(root / "file"), "dir": str(root / "dir"), "missing": str(root / "missing"), "root": root}


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
    "run": [["{file}"]],
}


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

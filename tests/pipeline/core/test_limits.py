"""The one loader of configuration documents (size, encoding, depth: one line naming the file,
never a RecursionError), the integer bound, and outputs that cannot be created (one line)."""

from __future__ import annotations

import json
import os
import sys

import pytest

from geopipe.pipeline.core import fsio
from geopipe.pipeline.core.errors import ConfigError, GeopipeError, check_int
from geopipe.pipeline.core.limits import MAX_CONFIG_DEPTH, load_json, load_toml, nesting_depth, parse_json


def test_nesting_depth_is_counted_without_recursion():
    assert nesting_depth(3) == 0 and nesting_depth([]) == 1 and nesting_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(200_000):  # far past the interpreter's recursion limit
        deep = [deep]
    assert nesting_depth(deep) == 200_001


def test_hostile_documents_are_one_line_naming_the_file(tmp_path):
    deep_json, deep_toml = tmp_path / "config.json", tmp_path / "run.toml"
    deep_json.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")  # RecursionError in json.loads before
    deep_toml.write_text("a = " + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=rf"^checkpoint config {deep_json} is nested deeper than {MAX_CONFIG_DEPTH} levels$"):
        load_json(str(deep_json), "checkpoint config")
    with pytest.raises(ConfigError, match=rf"^pipeline config {deep_toml} is nested deeper than {MAX_CONFIG_DEPTH} levels$"):
        load_toml(str(deep_toml), "pipeline config")
    shallow = tmp_path / "ok.json"
    shallow.write_text("[" * 60 + "]" * 60)  # a parser happily reads 100 levels: the limit is ours
    assert nesting_depth(load_json(str(shallow))) == 60
    (tmp_path / "ok65.json").write_text("[" * 65 + "]" * 65)
    with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
        load_json(str(tmp_path / "ok65.json"))
    binary = tmp_path / "b.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=rf"^pipeline config {binary} is not UTF-8 text \(byte 128: a binary file\?\)$"):
        load_toml(str(binary), "pipeline config")
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": "a" * 2048}))
    with pytest.raises(ConfigError, match=r"big.json is over the 1024 bytes limit for such a file$"):
        load_json(str(big), max_bytes=1024)
    with pytest.raises(ConfigError, match="not found"):
        load_toml(str(tmp_path / "none.toml"))
    (tmp_path / "bad.toml").write_text("a = = 1")
    with pytest.raises(ConfigError, match=r"bad.toml is not valid TOML"):
        load_toml(str(tmp_path / "bad.toml"))
    with pytest.raises(ConfigError, match=r"^x is not valid JSON"):
        parse_json("{", "x")


def test_check_int_bounds_both_ends():
    assert check_int(10**9, "steps", 1, maximum=10**9) == 10**9
    with pytest.raises(ConfigError, match=r"^steps must be an integer in \[1, 1,000,000,000\], got 100000000000000000000$"):
        check_int(10**20, "steps", 1, maximum=10**9)
    with pytest.raises(ConfigError, match=r"^steps must be an integer >= 1, got 0$"):
        check_int(0, "steps")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_outputs_that_cannot_be_created_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad, why in (("/proc/geopipe-x/out", "No such file or directory"), (str(tmp_path / "file" / "out"), "Not a directory")):
        with pytest.raises(fsio.OutputPathError, match=rf"^cannot create store {bad}: {why}; choose a writable location$") as err:
            fsio.makedirs(bad, "store")
        assert isinstance(err.value, GeopipeError) and isinstance(err.value, OSError)
        with pytest.raises(fsio.OutputPathError, match=rf"^cannot create file {bad}/r.json: {why}"):
            fsio.write_atomic(f"{bad}/r.json", b"{}")
    with pytest.raises(fsio.OutputPathError, match="cannot create file /proc/r.json"):  # the folder exists but takes no file
        fsio.temporary_beside("/proc/r.json")
    tmp = fsio.temporary_beside(str(tmp_path / "new" / "p.parquet"))
    assert os.path.basename(tmp).startswith(".p.parquet.") and tmp.endswith(".tmp") and os.path.getsize(tmp) == 0

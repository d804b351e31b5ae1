"""The demo world's stamp demo_world.json is JSON (before: a Python repr); a world stamped the old
way is still recognised (not regenerated) and its stamp rewritten as JSON."""

from __future__ import annotations

import json
import os

from geopipe.stages.demo import STAMP_SCHEMA, DemoDataConfig, run_demo_data


def _cfg(out, **kw):
    return DemoDataConfig(out=str(out), n_train=20, n_test=10, shard_size=20, image_size=16, **kw)


def test_stamp_is_json_and_a_rerun_skips(tmp_path):
    cfg = _cfg(tmp_path / "w", views_per_place=2)
    assert not run_demo_data(cfg).skipped
    doc = json.load(open(tmp_path / "w" / "demo_world.json"))
    assert doc["schema"] == STAMP_SCHEMA and doc["settings"]["n_train"] == 20 and doc["settings"]["views_per_place"] == 2
    assert "out" not in doc["settings"]
    assert run_demo_data(cfg).skipped
    assert not run_demo_data(_cfg(tmp_path / "w", views_per_place=2, seed=1)).skipped  # other settings: written anew


def test_a_legacy_repr_stamp_is_recognised_and_upgraded(tmp_path):
    cfg = _cfg(tmp_path / "w")
    run_demo_data(cfg)
    stamp = tmp_path / "w" / "demo_world.json"
    legacy = repr(cfg).replace(", views_per_place=1, test_views_per_place=None)", ")")
    stamp.write_text(legacy)
    before = {p: os.stat(p).st_mtime_ns for p in sorted(str(q) for q in (tmp_path / "w").glob("*.tar"))}
    again = run_demo_data(cfg)
    assert again.skipped and {p: os.stat(p).st_mtime_ns for p in again.shards} == before  # not regenerated
    shards = before
    assert json.loads(stamp.read_text())["schema"] == STAMP_SCHEMA
    res = run_demo_data(cfg)
    assert res.skipped and {p: os.stat(p).st_mtime_ns for p in res.shards} == shards

"""geopipe store info --json: one JSON object with the same facts as the text lines."""

from __future__ import annotations

import json

from click.testing import CliRunner
from tiny_models import tiny_store

from geopipe.flows.cli import cli


def test_store_info_json(tmp_path):
    store = tiny_store(tmp_path / "s.zarr", n=5)
    r = CliRunner().invoke(cli, ["store", "info", store, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["rows"] == 5 and doc["labelled"] == 5 and doc["unlabelled"] == 0 and doc["embed_dim"] == 8
    assert doc["backbone"]["name"] == "fake" and doc["size_bytes"] > 0 and isinstance(doc["rejects"], dict)
    text = CliRunner().invoke(cli, ["store", "info", store]).output
    assert "rows: 5 (5 labelled, 0 unlabelled)" in text and f"{doc['size_bytes']} bytes" in text

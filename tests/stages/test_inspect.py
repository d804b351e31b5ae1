"""geopipe inspect on a synthetic multi-view store: prototypes recover the places (geo-purity 1 at
25 m), galleries stay at the probe's place, probes read the difficulty, directions walk; and the
CLI end to end with its printed tables, files and one-line errors."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from synthetic_views import SyntheticConfig, write_synthetic_store

from geopipe.flows.cli import cli
from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.inspection.probes import ProbeConfig
from geopipe.stages.inspect import InspectConfig, run_inspect

CFG = SyntheticConfig(n_places=40, views_per_place=4, dim=16, noise_min=0.05, noise_span=0.1, difficulty_signal=4.0, seed=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("insp") / "views.zarr")
    return path, write_synthetic_store(path, CFG)


def test_stage_outputs(store, tmp_path):
    path, views = store
    out = str(tmp_path / "inspect")
    res = run_inspect(InspectConfig(store=path, out_dir=out, clusters=40, n_probes=5, k=3, directions=("difficulty",),
                                    direction_steps=(0.5,), probe_split=ProbeConfig(block_m=100.0), progress=False))
    proto = pq.read_table(res.paths["prototypes"]).to_pydict()
    assert len(proto["cluster"]) == 40 and min(proto["size"]) >= 1 and sum(proto["size"]) == 160
    # low view noise: each cluster is one place, its views within ~5 m of each other
    assert res.purity["25m"]["median"] == 1.0 and np.median(proto["spread_km"]) < 0.01
    assert all(len(m) == s - 1 for m, s in zip(proto["member_keys"], proto["size"]))
    assert all(np.isfinite(proto["heading_spread_deg"]))
    gal = pq.read_table(res.paths["galleries"]).to_pydict()
    kinds = np.array(gal["probe_kind"])
    assert (kinds == "record").sum() == 15 and (kinds == "centroid").sum() == 120 and (kinds == "direction").sum() == 15
    rec = kinds == "record"
    assert all(k != p for k, p in zip(np.array(gal["key"])[rec], np.array(gal["probe_key"])[rec]))
    assert np.array(gal["nn_geo_consistency"])[rec].min() == 1.0  # the other 3 views of the same place
    assert np.array(gal["distance_km"])[rec].max() < 0.025
    probes = json.load(open(res.paths["probes"]))
    by = {p["name"]: p for p in probes["probes"]}
    assert by["difficulty"]["r2_test"] > 0.5 and by["location"]["kind"] == "location"
    assert "capture_id" in probes["skipped"] and probes["config"]["clusters"] == 40
    assert "difficulty" in np.load(res.paths["directions"])


def test_cli_end_to_end_with_plots(store, tmp_path):
    path, views = store
    out = tmp_path / "cli"
    key = str(views["keys"][7])
    res = CliRunner().invoke(cli, ["inspect", "--store", path, "-o", str(out), "--keys", key, "-k", "2", "--clusters", "8",
                                   "--probe-fields", "difficulty,split", "--plots", "--block-m", "100"])
    assert res.exit_code == 0, res.output
    assert "geo-purity (median over clusters): 25m" in res.output and "difficulty" in res.output and "location" in res.output
    assert "majority" in res.output  # split is categorical (train/test)
    assert sorted(p.name for p in out.iterdir()) == sorted(["gallery-000.png", "galleries.parquet", "probe_directions.npz", "probes.json",
                                                            "prototypes.parquet", "prototypes.png"])
    assert (out / "gallery-000.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(cli, ["inspect", "--store", path, "-o", str(out), "--keys", "nope"])
    assert bad.exit_code == 1 and "no record with key 'nope'" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(cli, ["inspect", "--store", path, "-o", str(out), "--direction", "sky", "--probe-fields", "none"])
    assert bad.exit_code == 1 and "no probe direction 'sky'" in bad.output


def test_stage_errors(store, tmp_path):
    path, _ = store
    with pytest.raises(GeopipeError, match="no metadata field 'colour'"):
        run_inspect(InspectConfig(store=path, out_dir=str(tmp_path / "x"), probe_fields=("colour",), clusters=4, progress=False))
    with pytest.raises(GeopipeError, match="not a geopipe embedding store"):
        run_inspect(InspectConfig(store=str(tmp_path / "none.zarr"), out_dir=str(tmp_path / "y"), progress=False))

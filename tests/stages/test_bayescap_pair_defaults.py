"""`geopipe bayescap train` with default pair settings on a store of real-photo-like records (no
headings, no capture ids, photos of a place hundreds of metres apart: no two within 25 m) widens
to place pairs and trains; where even 25 km finds too few, one line names the flag and value
that trains, and that flag does train."""

import json

import numpy as np
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.writer import StoreWriter


def _photo_store(path, n_places, per_place, spread_m, spacing_km, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    place = np.repeat(np.arange(n_places), per_place)
    side = int(np.ceil(np.sqrt(n_places)))
    centre = np.stack([20 + (np.arange(n_places) // side) * spacing_km / 111.2,
                       10 + (np.arange(n_places) % side) * spacing_km / 104.5], 1)
    ll = centre[place] + rng.normal(scale=spread_m / 111_195.0, size=(place.size, 2))
    emb = rng.normal(size=(n_places, dim))[place] + 0.5 * rng.normal(size=(place.size, dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ident = {"name": "photos", "pretrained": None, "embed_dim": dim, "preprocess": {"source": "test"}, "fingerprint": "photos-16"}
    meta = {"split": [json.dumps("train") for _ in place]}
    with StoreWriter.open(str(path), backbone=ident, embed_dim=dim, dtype="float32", normalize=True) as w:
        w.append_shard("test://photos", emb, ll, [f"r{i}" for i in range(place.size)], meta, [], ShardStat(size=place.size, mtime=None))
    return str(path)


def test_default_pairs_widen_on_a_photo_collection(tmp_path):
    store = _photo_store(tmp_path / "photos.zarr", n_places=100, per_place=12, spread_m=300.0, spacing_km=30.0)
    r = CliRunner().invoke(cli, ["bayescap", "train", "--store", store, "-o", str(tmp_path / "bc"), "--steps", "4", "--val-every", "2"])
    assert r.exit_code == 0, r.output
    assert "place pairs within 1 km: too few viewpoint pairs within 25 m" in r.output and "trained bayescap-cycle" in r.output
    saved = json.loads((tmp_path / "bc" / "config.json").read_text())["pair_stats"]
    assert saved["radius_m"] == 1000.0 and saved["widened_from_m"] == 25.0 and saved["visual_filter"] == "none"


def test_too_few_pairs_names_the_flag_that_trains(tmp_path):
    # 300 records, places 100 km apart, 3 photos each within ~30 m: ~300 pairs at 25 km, under the 2,000 needed
    store = _photo_store(tmp_path / "sparse.zarr", n_places=100, per_place=3, spread_m=30.0, spacing_km=100.0)
    r = CliRunner().invoke(cli, ["bayescap", "train", "--store", store, "-o", str(tmp_path / "bc"), "--steps", "4"])
    assert r.exit_code == 1 and not (tmp_path / "bc").exists()
    (line,) = [x for x in r.stderr.splitlines() if x.strip()]
    assert "insufficient_pairs:" in line and "within 25 km, widened from 25 m" in line
    n = int(line.split("pass --min-pairs ")[1].split()[0])
    assert 100 < n < 2000 and f"to train on these {n} pairs" in line
    r = CliRunner().invoke(cli, ["bayescap", "train", "--store", store, "-o", str(tmp_path / "bc"), "--steps", "4", "--val-every", "2",
                                 "--min-pairs", str(n)])
    assert r.exit_code == 0 and "trained bayescap-cycle" in r.output, r.output

"""Multi-view demo world: views of one place share place_id, lie within metres, differ in
heading and capture, and yield viewpoint pairs once extracted; the single-view world is unchanged."""

import io
import json
import tarfile

import numpy as np

from geopipe.pipeline.eval.recall import haversine_m
from geopipe.pipeline.retrieval.split import decode_meta, group_ids
from geopipe.pipeline.retrieval.viewpoints import PairConfig, mine_pairs
from geopipe.pipeline.world.demo_world import DemoWorldConfig, write_demo_world


def _meta(paths):
    out = []
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    out.append(json.load(io.BytesIO(tar.extractfile(m).read())))
    return out


def test_views_share_a_place(tmp_path):
    res = write_demo_world(str(tmp_path), DemoWorldConfig(n_train=40, n_test=8, shard_size=16, seed=2, views_per_place=4))
    meta = _meta(res.train_shards)
    assert len(meta) == 40 and len({m["capture_id"] for m in meta}) == 40
    by_place = {}
    for m in meta:
        by_place.setdefault(m["place_id"], []).append(m)
    assert len(by_place) == 10 and all(len(v) == 4 for v in by_place.values())
    for views in by_place.values():
        lat, lon = np.array([v["latitude"] for v in views]), np.array([v["longitude"] for v in views])
        assert haversine_m(lat[:, None], lon[:, None], lat[None], lon[None]).max() <= 6.0
        assert len({round(v["heading_deg"]) for v in views}) == 4
    assert "views_per_place" in json.load(open(res.manifest))["config"]
    single = write_demo_world(str(tmp_path / "one"), DemoWorldConfig(n_train=4, n_test=0, seed=2))
    assert "views_per_place" not in json.load(open(single.manifest))["config"]
    assert "place_id" not in _meta(single.train_shards)[0]


def test_extracted_views_give_pairs(tmp_path):
    from geopipe.pipeline.store.reader import read_store
    from geopipe.stages.extract import ExtractConfig, run_extract

    res = write_demo_world(str(tmp_path / "w"), DemoWorldConfig(n_train=48, n_test=0, shard_size=48, seed=4, views_per_place=4))
    store = str(tmp_path / "s.zarr")
    run_extract(ExtractConfig(shards=res.train_shards, store=store, num_workers=0, batch_size=48, progress=False))
    data = read_store(store)
    heading = np.array([float(h) for h in decode_meta(data.meta["heading_deg"])])
    ps = mine_pairs(data.embeddings.astype(np.float32), data.latlon, heading, group_ids(decode_meta(data.meta["capture_id"])),
                    cfg=PairConfig(min_pairs=10, val_fraction=0.0))
    place = np.array(decode_meta(data.meta["place_id"]))
    assert ps.status == "ok" and (place[ps.train[:, 0]] == place[ps.train[:, 1]]).all()


def test_single_view_test_queries_against_a_multi_view_database(tmp_path):
    cfg = DemoWorldConfig(n_train=16, n_test=6, shard_size=16, seed=2, views_per_place=4, test_views_per_place=1)
    res = write_demo_world(str(tmp_path), cfg)
    train, test = _meta(res.train_shards), _meta(res.test_shards)
    assert len({m["place_id"] for m in train}) == 4
    assert len(test) == 6 and not any("place_id" in m for m in test)  # one photo per place, as the single-view world
    same = write_demo_world(str(tmp_path / "b"), DemoWorldConfig(n_train=16, n_test=6, shard_size=16, seed=2, views_per_place=4))
    assert _meta(same.train_shards) == train  # the database does not depend on the test split's views
    assert json.load(open(res.manifest))["config"]["test_views_per_place"] == 1
    assert "test_views_per_place" not in json.load(open(same.manifest))["config"]

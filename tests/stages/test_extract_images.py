"""geopipe extract on image files: folders, globs and tars in one call, labels, rejects, incremental runs, Dask."""

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from samples import good_sample

from geopipe.pipeline.ingest.shards import write_shards
from geopipe.pipeline.store.reader import open_store, read_store
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.stages.extract import ExtractConfig, ShardChangedError, run_extract


@pytest.fixture(scope="module")
def tiny():
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone

    return load_backbone(BackboneSpec("tiny"))


def _image(path, i: int, fmt: str | None = None, exif=None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(i)
    img = Image.fromarray((rng.uniform(0, 1, (20, 20, 3)) * 60 + rng.uniform(0, 190, 3)).astype(np.uint8))
    img.save(path, format=fmt, **({"exif": exif} if exif is not None else {}))


def _gps(lat: float, lon: float) -> Image.Exif:
    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: (abs(lat), 0.0, 0.0), 3: "E" if lon >= 0 else "W", 4: (abs(lon), 0.0, 0.0)}
    return exif


@pytest.fixture
def world(tmp_path):
    """photos/ (nested, sidecars, EXIF GPS, a corrupt jpg), loose/*.jpg and one tar."""
    photos, loose = tmp_path / "photos", tmp_path / "loose"
    for i in range(5):
        _image(photos / "2024" / "june" / f"IMG_{i:03d}.jpg", i)
        (photos / "2024" / "june" / f"IMG_{i:03d}.json").write_text(json.dumps({"latitude": 10.0 + i, "longitude": 20.0, "city": f"c{i}"}))
    _image(photos / "2024" / "gps.png", 10, "PNG", exif=_gps(-33.0, 151.0))
    _image(photos / "top.jpg", 11)
    (photos / "2024" / "june" / "IMG_002b.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    for i in range(3):
        _image(loose / f"L{i}.jpg", 20 + i)
    tar = write_shards(tmp_path / "shards", [good_sample(f"t{i}", 30 + i) for i in range(3)], "t", 3)
    return {"photos": photos, "loose": loose, "glob": str(loose / "*.jpg"), "tar": tar[0]}


def _cfg(inputs, store, **kw) -> ExtractConfig:
    return ExtractConfig(shards=tuple(inputs), store=str(store), **{"batch_size": 3, "num_workers": 0, "progress": False,
                                                                     "images_per_source": 3, **kw})


def _same(a, b) -> None:
    da, db = read_store(str(a)), read_store(str(b))
    assert da.keys.tolist() == db.keys.tolist()
    assert np.array_equal(da.embeddings.view(np.uint16), db.embeddings.view(np.uint16))
    assert np.array_equal(da.latlon, db.latlon, equal_nan=True)
    assert {k: v.tolist() for k, v in da.meta.items()} == {k: v.tolist() for k, v in db.meta.items()}
    assert da.attrs["shards"] == db.attrs["shards"] and da.attrs["fingerprint"] == db.attrs["fingerprint"]
    assert open_store(str(a)).rejects().equals(open_store(str(b)).rejects())


def test_folder_glob_and_tar_in_one_call(world, tmp_path, tiny):
    store = tmp_path / "s.zarr"
    res = run_extract(_cfg([str(world["photos"]), world["glob"], world["tar"]], store), backbone=tiny)
    data = read_store(str(store))
    keys = data.keys.tolist()
    june = [f"2024/june/IMG_{i:03d}" for i in range(5)]
    assert keys == ["top", "2024/gps", *june, "L0", "L1", "L2", "t0", "t1", "t2"] and len(set(keys)) == len(keys)
    latlon = dict(zip(keys, data.latlon.tolist()))
    assert [latlon[k] for k in june] == [[10.0 + i, 20.0] for i in range(5)]  # sidecars
    assert latlon["2024/gps"] == [-33.0, 151.0]  # EXIF GPS
    assert np.isnan(latlon["top"]).all() and np.isnan(latlon["L0"]).all()  # no label: unlabelled records
    assert (res.n_ok, res.n_unlabelled, res.n_rejected, res.rejects_by_reason) == (13, 4, 1, {"corrupt_image": 1})
    meta = {k: v.tolist() for k, v in data.meta.items()}
    assert json.loads(meta["file"][keys.index("2024/june/IMG_001")]) == "2024/june/IMG_001.jpg"
    assert json.loads(meta["label_source"][keys.index("2024/gps")]) == "exif"
    (rej,) = open_store(str(store)).rejects().to_pylist()
    assert (rej["key"], rej["shard"], rej["reason"]) == ("2024/june/IMG_002b", str(world["photos"] / "2024" / "june" / "IMG_002b.jpg"),
                                                          "corrupt_image")
    # 6 june files in sources of at most 3, the other folders' files, the tar: one record each
    assert len(data.attrs["shards"]) == 1 + 1 + 2 + 1 + 1
    # decode workers get the image sources pickled: the same store
    run_extract(_cfg([str(world["photos"]), world["glob"], world["tar"]], tmp_path / "w2.zarr", num_workers=2), backbone=tiny)
    _same(store, tmp_path / "w2.zarr")


def test_reruns_add_only_new_photos_and_changed_ones_follow_on_changed(world, tmp_path, tiny):
    store, inputs = tmp_path / "s.zarr", [str(world["photos"])]
    first = run_extract(_cfg(inputs, store), backbone=tiny)
    assert first.shards_done == 4
    again = run_extract(_cfg(inputs, store), backbone=tiny)
    assert (again.n_ok, again.n_rejected, again.shards_done, again.shards_skipped) == (0, 0, 0, 4)
    before = read_store(str(store))
    _image(world["photos"] / "2024" / "june" / "IMG_001a.jpg", 40)  # inside a recorded source's name range
    added = run_extract(_cfg(inputs, store), backbone=tiny)
    assert (added.n_ok, added.shards_done, added.shards_skipped) == (1, 1, 4)
    after = read_store(str(store))
    assert after.keys.tolist() == before.keys.tolist() + ["2024/june/IMG_001a"]
    assert np.array_equal(after.embeddings[: len(before.keys)].view(np.uint16), before.embeddings.view(np.uint16))
    assert run_extract(_cfg(inputs, store), backbone=tiny).shards_done == 0
    # an edited photo changes its source: refused by default, re-extracted on request
    path = world["photos"] / "top.jpg"
    _image(path, 99)
    os.utime(path, (1e9, 1e9))
    with pytest.raises(ShardChangedError, match=r"shard .*photos#top\.jpg changed since it was written"):
        run_extract(_cfg(inputs, store), backbone=tiny)
    redo = run_extract(_cfg(inputs, store, on_changed="reextract"), backbone=tiny)
    assert redo.shards_changed == (f"{world['photos']}#top.jpg",)
    assert (redo.shards_done, redo.n_ok) == (5, 8)  # a store's records are contiguous rows: its source and every later one
    # a touched but identical photo: changed by mtime, unchanged by content hash
    os.utime(path, (2e9, 2e9))
    assert run_extract(_cfg(inputs, store, verify_hash=True), backbone=tiny).shards_done == 0


def test_a_crashed_run_resumes_to_the_same_store(world, tmp_path, tiny, monkeypatch):
    inputs = [str(world["photos"]), world["glob"]]
    run_extract(_cfg(inputs, tmp_path / "ref.zarr"), backbone=tiny)
    real, calls = StoreWriter._commit, {"n": 0}

    def crash(self, update):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th source's arrays are written, its completion record is not
            raise RuntimeError("simulated crash")
        real(self, update)

    monkeypatch.setattr(StoreWriter, "_commit", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_extract(_cfg(inputs, tmp_path / "crash.zarr"), backbone=tiny)
    monkeypatch.setattr(StoreWriter, "_commit", real)
    assert len(open_store(str(tmp_path / "crash.zarr")).attrs["shards"]) == 3
    res = run_extract(_cfg(inputs, tmp_path / "crash.zarr"), backbone=tiny)
    assert (res.shards_done, res.shards_skipped) == (2, 3)
    _same(tmp_path / "ref.zarr", tmp_path / "crash.zarr")


def test_cli_labels_none_reads_no_labels(world, tmp_path):
    store = tmp_path / "blind.zarr"
    out = CliRunner().invoke(__import__("geopipe.flows.cli", fromlist=["cli"]).cli,
                             ["--quiet", "extract", str(world["photos"] / "2024"), "-o", str(store), "--labels", "none",
                              "--workers", "0", "--images-per-source", "2"])
    assert out.exit_code == 0, out.output
    data = read_store(str(store))
    assert len(data.keys) == 6 and np.isnan(data.latlon).all()
    assert len(data.attrs["shards"]) == 1 + 3  # gps.png; 6 june files (one corrupt) by 2
    assert open_store(str(store)).attrs["backbone"]["name"] == "tiny"


def test_dask_on_a_folder_gives_the_single_process_store(world, tmp_path, tiny):
    ref, store = tmp_path / "ref.zarr", tmp_path / "dask.zarr"
    run_extract(_cfg([str(world["photos"])], ref), backbone=tiny)
    res = run_extract(_cfg([str(world["photos"])], store, dask="local:2"))
    assert (res.n_ok, res.n_rejected, res.shards_done) == (7, 1, 4)
    _same(ref, store)

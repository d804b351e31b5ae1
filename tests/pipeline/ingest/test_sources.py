"""Inputs → sources: folders, globs, loose files and tars; image samples with sidecar/EXIF labels."""

import json
import os

import fsspec
import numpy as np
import pytest
from PIL import Image
from samples import good_sample

from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.ingest.images import IMAGE_FILE_EXTS, LABELS, exif_fields, image_source_sha256, iter_image_samples
from geopipe.pipeline.ingest.shards import write_shards
from geopipe.pipeline.ingest.sources import SampleReader, resolve_inputs


def _image(path, i: int, fmt: str | None = None, exif=None, size: int = 16) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(i)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    img.save(path, format=fmt, **({"exif": exif} if exif is not None else {}))
    return str(path)


def _gps_exif(lat_dms, lat_ref, lon_dms, lon_ref, when=None, status=None):
    exif = Image.Exif()
    gps = {1: lat_ref, 2: lat_dms, 3: lon_ref, 4: lon_dms}
    if status is not None:
        gps[9] = status
    exif[0x8825] = gps
    if when is not None:
        exif[0x8769] = {36867: when, 36881: "+02:00"}
    return exif


@pytest.fixture
def photos(tmp_path):
    """photos/{a.jpg, b.png, c.json (orphan), sub/d.jpg + d.json, sub/deep/e.webp, .hidden/x.jpg, notes.txt}."""
    root = tmp_path / "photos"
    _image(root / "a.jpg", 1)
    _image(root / "b.png", 2)
    _image(root / "sub" / "d.jpg", 3)
    (root / "sub" / "d.json").write_text(json.dumps({"latitude": 45.5, "longitude": -73.5, "city": "mtl"}))
    (root / "c.json").write_text("{}")
    _image(root / "sub" / "deep" / "e.webp", 4, "WEBP")
    _image(root / ".hidden" / "x.jpg", 5)
    (root / "notes.txt").write_text("not a photo")
    return root


def _samples(inputs, urls):
    reader = inputs.reader(urls)
    return [s for url in urls for s in reader(url)]


def test_a_folder_is_walked_recursively_and_grouped_by_folder(photos):
    inputs = resolve_inputs([str(photos)])
    urls = inputs.urls()
    root = str(photos)
    assert urls == [f"{root}#a.jpg:b.png", f"{root}#sub/d.jpg", f"{root}#sub/deep/e.webp"]
    assert inputs.n_images == 4  # hidden folders, json sidecars and other files are not images
    keys = [s["__key__"] for s in _samples(inputs, urls)]
    assert keys == ["a", "b", "sub/d", "sub/deep/e"]
    src = inputs.image_source(urls[1])
    assert src.files == (("sub/d.jpg", "sub/d.json"),)
    sizes = os.path.getsize(photos / "sub" / "d.jpg") + os.path.getsize(photos / "sub" / "d.json")
    assert src.stat.size == sizes and src.stat.mtime == max(os.path.getmtime(photos / "sub" / n) for n in ("d.jpg", "d.json"))


def test_sources_hold_at_most_per_source_files_in_name_order(tmp_path):
    for i in range(7):
        _image(tmp_path / "p" / f"IMG_{i:02d}.jpg", i)
    urls = resolve_inputs([str(tmp_path / "p")], per_source=3).urls()
    root = str(tmp_path / "p")
    assert urls == [f"{root}#IMG_00.jpg:IMG_02.jpg", f"{root}#IMG_03.jpg:IMG_05.jpg", f"{root}#IMG_06.jpg"]
    with pytest.raises(ConfigError, match="per_source must be an integer >= 1"):
        resolve_inputs([root], per_source=0)
    with pytest.raises(ConfigError, match=r"unknown labels 'gps'; choose one of \['auto', 'sidecar', 'exif', 'vpr-name', 'none'\]"):
        resolve_inputs([root], labels="gps")


def test_globs_loose_files_and_tars_in_one_call_with_unique_keys(photos, tmp_path):
    tars = write_shards(tmp_path / "shards", [good_sample(f"t{i}", i) for i in range(3)], "t", 2)
    brace = str(tmp_path / "shards" / "t-{000000..000001}.tar")
    inputs = resolve_inputs([str(photos / "*.jpg"), str(photos / "sub" / "d.jpg"), brace, str(photos / "sub")])
    urls = inputs.urls()
    assert urls == [f"{photos}#a.jpg", f"{photos / 'sub'}#d.jpg", *tars, f"{photos / 'sub'}#deep/e.webp"]
    samples = _samples(inputs, urls)
    keys = [s["__key__"] for s in samples]
    assert keys == ["a", "d", "t0", "t1", "t2", "deep/e"] and len(set(keys)) == len(keys)
    # a glob keys files under its folder before the first wildcard; a file named twice is read once
    deep = resolve_inputs([str(photos / "s*" / "**" / "*.webp")]).urls()
    assert deep == [f"{photos}#sub/deep/e.webp"]


def test_a_glob_of_shards_without_a_tar_suffix_still_reads_them_as_shards(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("part-0", "part-1"):
        (tmp_path / "d" / name).write_bytes(b"x")
    assert resolve_inputs([str(tmp_path / "d" / "part-*")]).urls() == [str(tmp_path / "d" / "part-0"), str(tmp_path / "d" / "part-1")]


def test_missing_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    (tmp_path / "x-0.tar").write_bytes(b"")
    with pytest.raises(GeopipeError) as exc:
        resolve_inputs([str(tmp_path / "nope.jpg")])
    assert str(exc.value) == f"image not found: {tmp_path / 'nope.jpg'} (check the path or brace pattern)"
    with pytest.raises(GeopipeError, match=r"shard not found: .*x-1\.tar \(check the path or brace pattern\)"):
        resolve_inputs([str(tmp_path / "x-{0..1}.tar")])
    with pytest.raises(GeopipeError, match=r"folder .*empty holds no image files \(jpg, jpeg, .*\) or tars"):
        resolve_inputs([str(tmp_path / "empty")])


def test_sidecar_exif_and_none_labels(tmp_path):
    root = tmp_path / "p"
    _image(root / "side.jpg", 1, exif=_gps_exif((1.0, 0.0, 0.0), "N", (2.0, 0.0, 0.0), "E"))
    (root / "side.json").write_text(json.dumps({"latitude": 10.0, "longitude": 20.0, "note": "n"}))
    _image(root / "gps.jpg", 2, exif=_gps_exif((33.0, 52.0, 4.0), "S", (151.0, 12.0, 36.0), "W", when="2024:06:01 12:34:56"))
    _image(root / "void.jpg", 3, exif=_gps_exif((10.0, 0.0, 0.0), "N", (10.0, 0.0, 0.0), "E", status="V"))
    _image(root / "plain.png", 4, "PNG")
    records = {}
    for labels in ("auto", "sidecar", "exif", "none"):  # vpr-name: tests/pipeline/vpr (these names are its rejects)
        inputs = resolve_inputs([str(root)], labels=labels)
        records[labels] = {s["__key__"]: json.loads(s["json"]) for s in _samples(inputs, inputs.urls())}
    lat, lon = -(33 + 52 / 60 + 4 / 3600), -(151 + 12 / 60 + 36 / 3600)
    auto = records["auto"]
    assert auto["side"] == {"latitude": 10.0, "longitude": 20.0, "note": "n", "label_source": "sidecar", "file": "side.jpg"}
    assert auto["gps"] == {"latitude": pytest.approx(lat, abs=1e-12), "longitude": pytest.approx(lon, abs=1e-12),
                           "label_source": "exif", "file": "gps.jpg", "datetime_original": "2024-06-01T12:34:56+02:00"}
    assert auto["void"] == {"file": "void.jpg"} and auto["plain"] == {"file": "plain.png"}  # no fix, no EXIF: unlabelled
    assert records["sidecar"]["gps"] == {"file": "gps.jpg", "datetime_original": "2024-06-01T12:34:56+02:00"}
    assert records["exif"]["side"] == {"latitude": 1.0, "longitude": 2.0, "label_source": "exif", "file": "side.jpg"}
    assert records["none"]["side"] == {"file": "side.jpg"}
    assert records["none"]["gps"] == {"file": "gps.jpg", "datetime_original": "2024-06-01T12:34:56+02:00"}
    # the sidecar is part of the source's stat only when labels read sidecars
    sizes = {labels: resolve_inputs([str(root)], labels=labels) for labels in ("auto", "none")}
    grew = sizes["auto"].stat(sizes["auto"].urls()[0]).size - sizes["none"].stat(sizes["none"].urls()[0]).size
    assert grew == os.path.getsize(root / "side.json")


def test_exif_fields_of_odd_bytes_are_no_label():
    assert exif_fields(b"not an image") == (None, None)
    assert exif_fields(b"") == (None, None)


def test_unreadable_files_are_error_samples_and_the_digest_matches(tmp_path):
    root = tmp_path / "p"
    _image(root / "a.jpg", 1)
    _image(root / "b.jpg", 2)
    (root / "b.json").write_text('{"latitude": 1, "longitude": 2}')
    inputs = resolve_inputs([str(root)])
    (url,) = inputs.urls()
    src = inputs.image_source(url)
    info = {}
    samples = list(iter_image_samples(src, info=info))
    assert [s["__url__"] for s in samples] == [str(root / "a.jpg"), str(root / "b.jpg")]
    assert info["sha256"] == image_source_sha256(src) == inputs.sha256(url)
    assert image_source_sha256(src, "none") != info["sha256"]  # the sidecar is not read under labels=none
    samples = SampleReader({url: src})(url, info := {})
    assert next(samples)["__key__"] == "a"  # files are read one at a time, as the samples are taken
    os.remove(root / "b.jpg")
    bad = next(samples)
    assert bad["__error__"][0] == "corrupt_image" and "cannot read the file: FileNotFoundError" in bad["__error__"][1]
    assert "jpg" not in bad and bad["__url__"] == str(root / "b.jpg")
    assert next(samples, None) is None and info["sha256"] is None


def test_recorded_sources_keep_their_files_and_new_files_form_new_sources(tmp_path):
    root = tmp_path / "p"
    for name in ("b", "d", "f"):
        _image(root / f"{name}.jpg", ord(name))
    first = resolve_inputs([str(root)], per_source=2).urls()
    assert first == [f"{root}#b.jpg:d.jpg", f"{root}#f.jpg"]
    recorded = {first[0]: {"b", "d"}, first[1]: {"f"}}
    for name in ("a", "c", "g"):  # before, inside and after the recorded ranges
        _image(root / f"{name}.jpg", ord(name))
    inputs = resolve_inputs([str(root)], per_source=2)
    urls = inputs.urls(recorded, recorded.__getitem__)
    assert urls == [f"{root}#a.jpg", first[0], f"{root}#c.jpg", first[1], f"{root}#g.jpg"]
    assert [f for f, _ in inputs.image_source(first[0]).files] == ["b.jpg", "d.jpg"]
    # without the store's keys a recorded source holds what lies in its name range
    by_range = resolve_inputs([str(root)], per_source=2)
    urls = by_range.urls(recorded)
    assert [f for f, _ in by_range.image_source(first[0]).files] == ["b.jpg", "c.jpg", "d.jpg"]
    assert urls == [f"{root}#a.jpg", first[0], first[1], f"{root}#g.jpg"]


def test_names_with_separators_round_trip_through_the_url(tmp_path):
    root = tmp_path / "p"
    _image(root / "x#1:2%.jpg", 1)
    inputs = resolve_inputs([str(root)])
    (url,) = inputs.urls()
    assert url == f"{root}#x%231%3A2%25.jpg"
    again = resolve_inputs([str(root)])
    assert again.urls([url], {url: {"x#1:2%"}}.__getitem__) == [url]


def test_fsspec_folders_and_globs():
    fs = fsspec.filesystem("memory")
    for i, path in enumerate(["/geo-src/p/a.jpg", "/geo-src/p/q/b.png"]):
        img = Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8))
        with fs.open(path, "wb") as fh:
            img.save(fh, format="JPEG" if path.endswith("jpg") else "PNG")
    fs.pipe("/geo-src/p/a.json", json.dumps({"latitude": 5.0, "longitude": 6.0}).encode())
    try:
        inputs = resolve_inputs(["memory://geo-src/p"])
        urls = inputs.urls()
        assert urls == ["memory:///geo-src/p#a.jpg", "memory:///geo-src/p#q/b.png"]
        samples = _samples(inputs, urls)
        assert [s["__key__"] for s in samples] == ["a", "q/b"]
        assert json.loads(samples[0]["json"])["latitude"] == 5.0
        assert resolve_inputs(["memory://geo-src/p/*.jpg"]).urls() == ["memory:///geo-src/p#a.jpg"]
    finally:
        fs.rm("/geo-src", recursive=True)


def test_image_extensions_and_cli_choices():
    from click.testing import CliRunner

    from geopipe.flows.cli import cli

    assert {"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp"} <= set(IMAGE_FILE_EXTS)
    out = CliRunner().invoke(cli, ["extract", "--help"]).output
    assert "[auto|sidecar|exif|vpr-name|none]" in out and list(LABELS) == ["auto", "sidecar", "exif", "vpr-name", "none"]

"""`geopipe locate`: a folder of photos without any coordinates → one GeoParquet row per photo."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.ingest.shards import iter_tar_samples
from geopipe.stages.train import TrainConfig, run_train


@pytest.fixture(scope="module")
def vmf_model(demo_stores, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("locate") / "vmf")
    run_train(TrainConfig(store=demo_stores["train"], out=out, method="vmf", dim=16, depth=1, steps=20, warmup=2, batch_size=64,
                          val_every=20, seed=0, resume=False, device="cpu", progress=False))
    return out


@pytest.fixture()
def photos(demo_world, tmp_path):
    """Six test photos as plain JPEG files (no json, no EXIF), one in a subfolder, and one broken file."""
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for i, sample in enumerate(list(iter_tar_samples(demo_world["test"]))[:6]):
        folder = root / "trip" if i == 5 else root
        (folder / f"IMG_{i:04d}.jpg").write_bytes(sample["jpg"])
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_locate_a_folder_of_unlabelled_photos(vmf_model, photos, tmp_path):
    out = str(tmp_path / "where.parquet")
    args = ["-q", "locate", "-c", vmf_model, str(photos), "-o", out, "--region", "0.9", "--localizability", "8", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    table = pq.read_table(out).to_pandas()
    assert sorted(table["key"]) == [f"IMG_{i:04d}" for i in range(5)] + ["trip/IMG_0005"]
    assert np.isfinite(table[["lat", "lon"]].to_numpy()).all()
    assert table["true_lat"].isna().all() and table["distance_km"].isna().all()  # null truth: nobody knows where they were taken
    assert table["region"].notna().all() and (table["region_area_km2"] > 0).all()
    assert (abs(table["region_mass"] - 0.9) < 0.02).all()
    assert "photo" in res.output and "IMG_0000" in res.output  # the table on stdout
    assert "not located: broken: corrupt_image" in res.output  # the unreadable file, with its reason
    assert os.path.isdir(tmp_path / "where.zarr")  # embeddings kept for reruns

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and "exists; pass --overwrite" in again.output
    third = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert third.exit_code == 0, third.output
    assert pq.read_table(out).num_rows == 6


def test_locate_through_the_python_api_agrees(vmf_model, photos, tmp_path):
    from geopipe import Geolocator

    out = str(tmp_path / "p.parquet")
    res = CliRunner().invoke(cli, ["-q", "locate", "-c", vmf_model, str(photos / "IMG_0000.jpg"), str(photos / "IMG_0001.jpg"),
                                   "-o", out, "--device", "cpu", "--guidance", "0"])
    assert res.exit_code == 0, res.output
    cli_rows = pq.read_table(out).to_pandas().set_index("key")
    api = Geolocator.load(vmf_model, device="cpu").predict([str(photos / "IMG_0000.jpg"), str(photos / "IMG_0001.jpg")],
                                                           keys=["IMG_0000", "IMG_0001"], guidance=0.0)
    # vMF points are the mode: deterministic, so the CLI (float16 store) and the API (float32) agree closely
    np.testing.assert_allclose(cli_rows.loc[api.keys, "lat"].to_numpy(), api.lat, atol=0.05)


def test_locate_refuses_a_model_without_photos(vmf_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.jpg").write_bytes(b"nope")
    res = CliRunner().invoke(cli, ["-q", "locate", "-c", vmf_model, str(tmp_path / "empty"), "-o", str(tmp_path / "o.parquet"),
                                   "--device", "cpu"])
    assert res.exit_code == 1 and "none of the 1 input(s) could be read" in res.output

"""One definition of "same embedding space", and every consumer refusing a store of another space.

The drill of the locate issue: two imported 32-d stores of equal width whose backbones differ
(``--backbone-name bbA`` / ``bbB``); a model trained on A must refuse to score B in one line
naming both, while scoring A works.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from geopipe.flows.cli import cli
from geopipe.pipeline.store.space import (
    EmbeddingSpaceError,
    check_same_space,
    embedding_space,
    same_space,
    space_difference,
)

A = {"name": "ViT-B-32", "pretrained": "openai", "fingerprint": "aa" * 32, "preprocess": {"size": 224}}


def test_same_space_rules():
    a = embedding_space(A, 512, True)
    assert same_space(a, embedding_space(dict(A), 512, True))
    assert space_difference(a, embedding_space(A, 768, True)) == "width 512 vs 768"
    assert space_difference(a, embedding_space({**A, "fingerprint": "bb" * 32}, 512, True)) == "backbone weights (fingerprint)"
    assert space_difference(a, embedding_space({**A, "preprocess": {"size": 336}}, 512, True)) == "preprocessing"
    assert space_difference(a, embedding_space(A, 512, False)) == "normalisation (L2-normalised vs raw)"
    # records without a fingerprint (old stores) fall back to name + pretrained tag
    old = embedding_space({"name": "ViT-B-32", "pretrained": "openai"}, 512, True)
    assert same_space(a, old)
    assert not same_space(old, embedding_space({"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}, 512, True))
    # unknown normalisation / preprocessing on one side is not a difference
    assert same_space(a, embedding_space({k: v for k, v in A.items() if k != "preprocess"}, 512, None))


def test_check_same_space_names_both_sides_in_one_line():
    a, b = embedding_space(A, 32, True), embedding_space({**A, "name": "bbB", "fingerprint": "cc" * 32}, 32, True)
    with pytest.raises(EmbeddingSpaceError) as err:
        check_same_space("model m/", a, "store b.zarr", b)
    msg = str(err.value)
    assert "\n" not in msg and "model m/" in msg and "store b.zarr" in msg and "'ViT-B-32'" in msg and "'bbB'" in msg


def _pair(folder, n, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    np.save(folder / "part.npy", rng.standard_normal((n, 32)).astype(np.float32))
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    pq.write_table(pa.table({"key": [f"r{i:04d}" for i in range(n)], "latitude": lat, "longitude": lon}), folder / "part.parquet")
    return str(folder / "part.npy")


def test_predict_refuses_a_store_of_another_backbone_of_equal_width(tmp_path):
    run = CliRunner().invoke
    for name, seed in (("bbA", 0), ("bbB", 1)):
        res = run(cli, ["-q", "import", _pair(tmp_path / f"src{name}", 96, seed), "--store", str(tmp_path / f"{name}.zarr"),
                        "--backbone-name", name])
        assert res.exit_code == 0, res.output
    ckpt = str(tmp_path / "m")
    res = run(cli, ["-q", "train", "--store", str(tmp_path / "bbA.zarr"), "-o", ckpt, "--dim", "16", "--depth", "1", "--steps", "2",
                    "--batch-size", "32", "--warmup", "1", "--val-every", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    ok = run(cli, ["-q", "predict", "-c", ckpt, "--store", str(tmp_path / "bbA.zarr"), "-o", str(tmp_path / "a.parquet"),
                   "--steps", "2", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output
    bad = run(cli, ["-q", "predict", "-c", ckpt, "--store", str(tmp_path / "bbB.zarr"), "-o", str(tmp_path / "b.parquet"),
                    "--steps", "2", "--device", "cpu"])
    assert bad.exit_code == 1
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "'bbA'" in lines[0] and "'bbB'" in lines[0] and "different embedding spaces" in lines[0], bad.output
    assert not (tmp_path / "b.parquet").exists()

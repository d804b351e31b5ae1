"""The README's Python example ("Geolocate your photos") runs as written, on a tiny model trained
where the example expects the demo model and on two demo-world photos without coordinates."""

import os
import re

from geopipe.pipeline.ingest.shards import iter_tar_samples
from geopipe.stages.train import TrainConfig, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Geolocate your photos"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_python_example_runs(demo_world, demo_stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_train(TrainConfig(store=demo_stores["train"], out="data/demo/model", method="vmf", dim=16, depth=1, steps=10, warmup=2,
                          batch_size=64, val_every=10, seed=0, resume=False, device="cpu", progress=False))
    os.makedirs("photos")
    for i, sample in enumerate(list(iter_tar_samples(demo_world["test"]))[:2], start=1):
        with open(f"photos/IMG_{i:04d}.jpg", "wb") as fh:
            fh.write(sample["jpg"])
    scope: dict = {}
    exec(compile(_example(), "README.md", "exec"), scope)  # noqa: S102 - the documentation's own code
    res = scope["res"]
    assert len(res) == 2 and res.samples.shape == (2, 64, 2) and len(res.region(0.9)) == 2
    assert len(res.to_geodataframe()) == 2

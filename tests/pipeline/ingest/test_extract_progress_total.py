"""extract's progress total is estimated from the images of the shards already committed (before:
from every image embedded so far, parts of later shards included, so the total overshot — 3007
for 3000 — and jumped back at the end)."""

from __future__ import annotations

import pytest

import geopipe.pipeline.ingest.embed as embed
from geopipe.pipeline.core.progress import Progress
from geopipe.stages.demo import DemoDataConfig, run_demo_data
from geopipe.stages.extract import ExtractConfig, run_extract


class _Recording(Progress):
    totals: list = []

    @Progress.total.setter
    def total(self, value):
        _Recording.totals.append((self.n, value))
        Progress.total.fset(self, value)


def test_total_never_overshoots(tmp_path, monkeypatch):
    shards = run_demo_data(DemoDataConfig(out=str(tmp_path / "w"), n_train=96, n_test=8, shard_size=16, image_size=16)).shards
    train = [s for s in shards if "train-" in s]
    monkeypatch.setattr(embed, "Progress", _Recording)
    _Recording.totals = []
    res = run_extract(ExtractConfig(shards=tuple(train), store=str(tmp_path / "s.zarr"), batch_size=5, num_workers=2, progress=True))
    assert res.n_ok == 96 and len(_Recording.totals) == 6
    for n, total in _Recording.totals:
        assert n <= total <= 96 * 1.05, _Recording.totals  # the shards hold 16 images each: bytes per image are near equal
    assert _Recording.totals[-1][1] == pytest.approx(96, abs=1)

"""Query/database splits of one store: by column, spatial blocks, capture, leave-one-out."""

import json

import numpy as np
import pytest

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.retrieval.split import SplitConfig, group_ids, spatial_blocks, split_rows


def _meta(values):
    return np.array([json.dumps(v) if v is not None else "" for v in values], dtype=object)


def test_column_split_and_capture_groups():
    ll = np.zeros((4, 2))
    meta = {"split": _meta(["train", "test", "train", "test"]), "capture_id": _meta(["a", "a", "b", None])}
    qd = split_rows(ll, meta, SplitConfig())
    assert qd.query_rows.tolist() == [1, 3] and qd.db_rows.tolist() == [0, 2]
    assert qd.db_groups[0] == qd.query_groups[0]  # query 1 shares capture "a" with row 0
    assert len(set(qd.db_groups.tolist())) == 3


def test_blocks_never_feed_both_sides():
    rng = np.random.default_rng(0)
    ll = np.stack([rng.uniform(45, 45.05, 2000), rng.uniform(7, 7.05, 2000)], axis=1)
    qd = split_rows(ll, {}, SplitConfig(mode="blocks", block_m=500))
    blocks = spatial_blocks(ll, 500)
    assert not set(blocks[qd.query_rows]) & set(blocks[qd.db_rows])
    assert 0.05 < qd.query_rows.size / 2000 < 0.4


def test_leave_one_out_excludes_self():
    qd = split_rows(np.zeros((3, 2)), {}, SplitConfig(mode="leave_one_out"))
    assert qd.query_rows.tolist() == qd.db_rows.tolist() == [0, 1, 2]
    assert qd.query_groups.tolist() == [0, 1, 2]


def test_errors_name_the_problem():
    with pytest.raises(GeopipeError, match="no metadata field 'split'"):
        split_rows(np.zeros((2, 2)), {}, SplitConfig())
    with pytest.raises(GeopipeError, match="database side empty"):
        split_rows(np.zeros((2, 2)), {"split": _meta(["test", "test"])}, SplitConfig())
    assert group_ids([None, None, 1, 1]).tolist() == [0, 1, 2, 2]

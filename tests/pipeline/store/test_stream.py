"""Streaming batches from a store: bounded buffer, seeded per-epoch order, seek = resume, fsspec."""

import numpy as np
import pytest
import torch

from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.stream import StoreStream, scan_store
from geopipe.pipeline.store.writer import StoreWriter

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 6, "preprocess": {"size": 8}, "fingerprint": "abc"}
N, CHUNK = 192, 16


def _store(path, n=N, chunk=CHUNK):
    """A float32 store whose embedding column 0 is the row index (so batches reveal their rows)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 6)).astype(np.float32)
    emb[:, 0] = np.arange(n)
    ll = np.column_stack([rng.uniform(-80, 80, n), rng.uniform(-170, 170, n)])
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=6, dtype="float32", normalize=False, chunk_rows=chunk) as w:
        for s in range(0, n, 50):
            e = min(n, s + 50)
            w.append_shard(f"s{s}.tar", emb[s:e], ll[s:e], [f"k{i}" for i in range(s, e)], {}, [], ShardStat(1, 1.0))
    return str(path), ll


def _rows(stream, n_batches):
    out = []
    for _ in range(n_batches):
        _, c = stream.next_batch()
        out.append(c[:, 0].numpy().astype(int))
    return np.concatenate(out)


def test_each_epoch_is_a_seeded_permutation_that_differs_per_epoch(tmp_path):
    path, ll = _store(tmp_path / "s.zarr")
    with StoreStream(path, 8, seed=1, buffer_chunks=2) as s:
        rows = _rows(s, 3 * N // 8)
        x, c = s.next_batch()
    e0, e1, e2 = rows[:N], rows[N : 2 * N], rows[2 * N :]
    for e in (e0, e1, e2):
        assert sorted(e) == list(range(N))  # every row exactly once per epoch
    assert not (e0 == e1).all() and not (e1 == e2).all()
    assert x.dtype == torch.float32 and torch.allclose(x.norm(dim=1), torch.ones(8))
    with StoreStream(path, 8, seed=1, buffer_chunks=2) as again, StoreStream(path, 8, seed=2, buffer_chunks=2) as other:
        assert (_rows(again, N // 8) == e0).all()
        assert not (_rows(other, N // 8) == e0).all()
    # a window mixes rows of different chunks, so the order is not chunk-contiguous
    assert len({r // CHUNK for r in e0[:8]}) > 1


def test_seek_continues_the_same_stream_with_a_selection(tmp_path):
    path, _ = _store(tmp_path / "s.zarr")

    def select(keys):
        return np.array([int(k[1:]) % 5 != 0 for k in keys])

    counts = scan_store(path, select).counts
    assert counts.sum() == N - len(range(0, N, 5))
    with StoreStream(path, 7, seed=3, select=select, buffer_chunks=3, counts=counts) as s:
        ref = _rows(s, 60)  # 420 rows: crosses epochs (153 rows each) and windows mid-batch
    assert not (ref % 5 == 0).any()
    with StoreStream(path, 7, seed=3, select=select, buffer_chunks=3, start_batch=37) as s:
        assert (_rows(s, 23) == ref[37 * 7 :]).all()
        assert s.windows_read < 10  # the seek skipped earlier windows without reading them


def test_buffer_stays_bounded_on_a_store_larger_than_it(tmp_path):
    n, chunk, batch, buffer_chunks, prefetch = 2048, 32, 16, 2, 2
    path, _ = _store(tmp_path / "big.zarr", n=n, chunk=chunk)
    store_bytes = n * (6 * 4 + 16)
    with StoreStream(path, batch, seed=0, buffer_chunks=buffer_chunks, prefetch=prefetch) as s:
        rows = _rows(s, 2 * n // batch)
    window = (buffer_chunks * chunk + batch) * (6 * 4 + 16)
    queued = (prefetch + 1) * batch * (6 * 4 + 3 * 4)
    assert 0 < s.peak_bytes <= window + queued
    assert store_bytes > 10 * (window + queued)
    assert sorted(rows[:n]) == list(range(n))


@pytest.mark.filterwarnings("ignore:store memory:UserWarning")
def test_streams_an_fsspec_store_and_reports_reader_errors(tmp_path):
    pytest.importorskip("fsspec")
    url = "memory://geopipe-stream-test/s.zarr"
    try:
        _store(url)
        with StoreStream(url, 16, seed=0) as s:
            assert sorted(_rows(s, N // 16)) == list(range(N))
    finally:
        import fsspec

        fsspec.filesystem("memory").rm("/geopipe-stream-test", recursive=True)

    path, _ = _store(tmp_path / "s.zarr")

    def broken(keys):
        raise ValueError("bad selection")

    with StoreStream(path, 8, seed=0, select=broken, counts=np.full(N // CHUNK, CHUNK)) as s:
        with pytest.raises(ValueError, match="bad selection"):
            s.next_batch()

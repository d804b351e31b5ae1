"""geopipe import reads an (N, D) .npy and its Parquet metadata a store chunk at a time: the
pair's rows come from lazy NpyRows / ParquetRows sources, and validating, preparing and writing
them never holds more than a block or three of a few chunks (plus the rejected rows inside it),
whatever N is. Real .npy/Parquet files (several row groups), a real store."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geopipe.pipeline.ingest import pairs as pairs_mod
from geopipe.pipeline.ingest.pairs import ColumnSpec, EmbeddingPair, NpyRows, PairError, commit_pair, precomputed_identity
from geopipe.pipeline.ingest.rows import ParquetRows
from geopipe.pipeline.store.format import ShardStat, prepare_embeddings, shard_digest
from geopipe.pipeline.store.reader import read_store
from geopipe.pipeline.store.verify import verify_store
from geopipe.pipeline.store.writer import StoreWriter

N, D, CHUNK = 2_500, 8, 256


def _pair(tmp_path, dtype="float32"):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N, D)).astype(dtype)
    emb[7] = 0  # unusable embedding
    lat = rng.uniform(-80, 80, N)
    lat[300] = np.nan  # unusable coordinate
    np.save(tmp_path / "x.npy", emb)
    keys = [f"k{i}" for i in range(N)]
    keys[1000] = "k999"  # repeated key
    city = [None if i % 7 == 0 else f"c{i % 13}" for i in range(N)]  # a string field, absent in some rows
    pop = [None if i < 900 else i for i in range(N)]  # a number field first present past the first blocks
    pq.write_table(pa.table({"key": keys, "latitude": lat, "longitude": rng.uniform(-180, 180, N), "pop": pop, "city": city}),
                   tmp_path / "x.parquet", row_group_size=700)
    return EmbeddingPair(str(tmp_path / "x.npy"), str(tmp_path / "x.parquet")), emb


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_pair_is_validated_prepared_and_written_a_chunk_at_a_time(tmp_path, dtype):
    pair, emb = _pair(tmp_path, dtype)
    sources = []

    class Counted(ParquetRows):  # the real reader, kept to read its accounting afterwards
        def __init__(self, url):
            super().__init__(url)
            sources.append(self)

    class CountedNpy(NpyRows):
        def __init__(self, url, *args, **kw):
            super().__init__(url, *args, **kw)
            if not args and not kw:
                sources.append(self)

    monkey = pytest.MonkeyPatch()
    monkey.setattr(pairs_mod, "ParquetRows", Counted)
    monkey.setattr(pairs_mod, "NpyRows", CountedNpy)
    store = str(tmp_path / "s.zarr")
    try:
        with StoreWriter.open(store, backbone=precomputed_identity("t", D), embed_dim=D, chunk_rows=CHUNK) as writer:
            n_ok, rejects = commit_pair(writer, pair, ColumnSpec(), ShardStat(1, None))
            record, block = writer.shards[pair.url], writer.block_rows
    finally:
        monkey.undo()
    assert CHUNK <= block <= 4 * CHUNK < N
    assert n_ok == N - 3 and [r.reason for r in rejects] == ["invalid_embedding", "invalid_coordinates", "duplicate_key"]
    meta_rows, npy_rows = next(s for s in sources if isinstance(s, ParquetRows)), next(s for s in sources if isinstance(s, NpyRows))
    assert 0 < npy_rows.peak_rows <= block + 3  # one block of kept rows, and the rejected ones between them
    assert 0 < meta_rows.peak_rows <= 3 * block < N  # the batches around one block of kept rows, never the file

    data = read_store(store)
    kept = np.setdiff1d(np.arange(N), [7, 300, 1000])
    expected, _ = prepare_embeddings(emb[kept], "float16", True)
    np.testing.assert_array_equal(data.embeddings, expected)
    assert record["digest"] == shard_digest(data.keys.tolist(), data.embeddings, data.latlon)
    assert verify_store(store) == []
    assert data.meta["pop"][0] == "" and data.meta["pop"][-1] == str(N - 1) and data.meta["city"][1] == '"c1"'


def test_npy_rows_reads_slices_and_refuses_what_it_cannot_slice(tmp_path):
    x = np.arange(60, dtype=np.float32).reshape(20, 3)
    np.save(tmp_path / "a.npy", x)
    rows = NpyRows(str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(rows[5:9], x[5:9])
    view = rows.select([1, 4, 5, 19])
    np.testing.assert_array_equal(view[1:3], x[[4, 5]])
    assert view.shape == (4, 3) and rows.peak_rows == 4 and len(view[4:9]) == 0
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    with pytest.raises(PairError, match="Fortran"):
        NpyRows(str(tmp_path / "f.npy"))
    (tmp_path / "bad.npy").write_bytes(b"not an npy")
    with pytest.raises(PairError, match="not a readable .npy"):
        NpyRows(str(tmp_path / "bad.npy"))

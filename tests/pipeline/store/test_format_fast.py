"""The fast paths of the store format agree with the exact rules: one-pass row checks, plain JSON strings."""

import json

import numpy as np
import pyarrow as pa

from geopipe.pipeline.ingest.pairs import _json_texts
from geopipe.pipeline.store.format import encode_meta, meta_encoding, prepare_embeddings, usable_embeddings


def test_row_checks_match_the_exact_rule_and_normalise_huge_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32) * 3
    x[3, 2], x[5], x[7, 1], x[9, 0], x[11] = np.nan, 0, np.inf, 1e30, 7e4  # 1e30 squared overflows float32
    for dtype in ("float16", "float32"):
        for normalize in (True, False):
            y, ok = prepare_embeddings(x, dtype, normalize)
            exact = np.isfinite(x).all(1) & ((np.abs(x).sum(1) > 0) if normalize else True)
            if dtype == "float16" and not normalize:
                exact &= ~(np.abs(np.nan_to_num(x)) > 65504).any(1)
            assert (ok == exact).all() and (usable_embeddings(x, dtype, normalize) == ok).all()
            if normalize:
                want = x[ok] / np.linalg.norm(x[ok].astype(np.float64), axis=1, keepdims=True)
                np.testing.assert_allclose(y[ok].astype(np.float64), want, atol=1e-3 if dtype == "float16" else 1e-6)


def test_plain_json_strings_round_trip_like_json():
    values = ["a", "é x", 'q"t', "b\\c", "\n", "\u2028", "", "12"]
    texts = _json_texts(pa.chunked_array([pa.array(values + [None])]))
    assert texts == [json.dumps(v, ensure_ascii=False) for v in values] + [None]
    stored = encode_meta(texts[:-1] + ["null"], meta_encoding(texts[:-1]))
    assert stored.tolist() == values + [""]
    assert meta_encoding(['"a"', "3"]) == "json" and meta_encoding(['"a"b"']) == "json"

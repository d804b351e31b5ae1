"""The epistemic score's sign: ``log_u_epi`` (MC-dropout variance of μ) is higher where the heads
extrapolate. Constructed case: BayesCap learns view pairs of places whose embeddings span 8 of
32 directions; queries of new places in the other 24 directions have no database match, so their
retrieval error is large, and their epistemic score must be higher (positive Spearman with the
error), while it stays finite for in-distribution queries."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from geopipe.pipeline.eval.recall import haversine_m
from geopipe.pipeline.uncertainty.bayescap import BayesCapConfig, BayesCapMLP, BayesCapTrainConfig, train_bayescap
from geopipe.pipeline.uncertainty.mc_dropout import score_embeddings

D = 32


def _views(rng, basis, latlon, per, noise=0.3):
    latent = rng.normal(size=(len(latlon), basis.shape[1])) @ basis.T
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    place = np.repeat(np.arange(len(latlon)), per)
    e = latent[place] + noise * rng.normal(size=(place.size, D)) / np.sqrt(D)
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32), latlon[place], latent


@pytest.mark.parametrize("seed", [0, 2])
def test_epistemic_score_rises_with_the_error_of_unseen_places(seed):
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0]
    seen, unseen = basis[:, :8], basis[:, 8:]
    db_ll = np.stack([rng.uniform(-60, 60, 300), rng.uniform(-180, 180, 300)], 1)
    emb, _, latent = _views(rng, seen, db_ll, 4)
    pairs = np.array([(i, j) for p in range(300) for i in range(4 * p, 4 * p + 4) for j in range(i + 1, 4 * p + 4)])
    torch.manual_seed(seed)
    model = BayesCapMLP(BayesCapConfig(D))
    train_bayescap(model, emb, pairs[:1500], pairs[1500:], BayesCapTrainConfig(steps=400, lr=3e-3, val_every=100, seed=seed))
    # queries: new views of database places (found again) and views of new places (no match anywhere)
    pick = rng.choice(300, 100, replace=False)
    q_in = latent[pick] + 0.3 * rng.normal(size=(100, D)) / np.sqrt(D)
    new_ll = np.stack([rng.uniform(-60, 60, 100), rng.uniform(-180, 180, 100)], 1)
    q_out, _, _ = _views(rng, unseen, new_ll, 1)
    q = np.r_[q_in / np.linalg.norm(q_in, axis=1, keepdims=True), q_out].astype(np.float32)
    truth = np.r_[db_ll[pick], new_ll]
    top1 = np.argmax(q @ latent.T, axis=1)  # retrieval: the most similar database place
    err_km = haversine_m(truth[:, 0], truth[:, 1], db_ll[top1, 0], db_ll[top1, 1]) / 1000.0
    assert np.median(err_km[:100]) < 1.0 < 1000.0 < np.median(err_km[100:])
    s = score_embeddings(model, q, passes=15)
    epi = s["log_u_epi"]
    finite = np.isfinite(epi)
    assert finite[:100].all()  # in distribution the dropout ensemble always has a spread
    # higher = less certain: up with the error (a record whose every trunk unit is silent scores −inf: left out, as evaluate does)
    assert spearmanr(epi[finite], err_km[finite])[0] > 0.3
    assert np.median(epi[100:][finite[100:]]) > np.median(epi[:100]) + 0.5

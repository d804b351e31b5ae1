"""BayesCap network and MC-dropout scoring against the spec's oracles (parameter counts, head
conventions, MC variance, log-space geometric means, GGD sampling) plus a short training run."""

import json
import math
import pathlib

import numpy as np
import pytest
import torch

from geopipe.pipeline.uncertainty.bayescap import BayesCapConfig, BayesCapMLP, BayesCapTrainConfig, bayescap_parameter_counts, train_bayescap
from geopipe.pipeline.uncertainty.losses import log_ggd_variance, sample_ggd
from geopipe.pipeline.uncertainty.mc_dropout import aggregate_log, heads_to_alpha_beta, mc_passes, population_variance, score_embeddings

ORACLES = json.loads((pathlib.Path(__file__).parents[1] / "eval" / "uncertainty_oracles.json").read_text())
T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


@pytest.mark.parametrize("name", list(ORACLES["K_params"]))
def test_parameter_counts(name):
    d = int(name.split(",")[0][2:])
    heads = name.split("heads=")[1]
    model = BayesCapMLP(BayesCapConfig(d, head_hidden=d if heads == "full" else int(heads)))
    assert bayescap_parameter_counts(model) == ORACLES["K_params"][name]


@pytest.mark.parametrize("convention,key", [("probvlm", "probvlm_eval"), ("bayescap", "bayescap_eval"),
                                            ("train_consistent", "train_consistent_eps_1em4")])
def test_head_conventions(convention, key):
    c = ORACLES["C2_from_heads"]
    a, b = heads_to_alpha_beta(T(c["h_one_over_alpha"]), T(c["h_beta"]), convention)
    assert math.exp(float(log_ggd_variance(a, b))) == pytest.approx(c[key], rel=1e-9)


def test_mc_variance_and_geometric_means():
    d = ORACLES["D_mc_dropout"]
    p = T(d["passes"])
    np.testing.assert_allclose(population_variance(p).numpy(), d["var_population"], rtol=1e-12)
    np.testing.assert_allclose(p.var(dim=0).numpy(), d["var_unbiased"], rtol=1e-12)
    e = ORACLES["E_geometric_mean"]
    alea, epi = T(e["alea"]), T(e["epi"])
    log_epi = torch.where(epi > 0, torch.log(epi.clamp_min(1e-300)), torch.tensor(-math.inf, dtype=torch.float64))
    log_tot = torch.logaddexp(torch.log(alea), log_epi)
    np.testing.assert_allclose(log_tot.exp().numpy(), e["total"], rtol=1e-12)
    assert float(aggregate_log(log_tot[None])) == pytest.approx(e["log_u"], rel=1e-12)
    u = ORACLES["E2_underflow"]
    vals = torch.full((1, u["d"]), u["value"], dtype=torch.float64)
    assert float(vals.prod()) == u["naive_product"]
    assert math.exp(float(aggregate_log(vals.log()))) == pytest.approx(u["geo_mean_logspace"], rel=1e-12)
    s = ORACLES["E3_small"]
    assert math.exp(float(aggregate_log(T(s["values"]).log()[None]))) == pytest.approx(s["geo_mean"], rel=1e-12)


def test_ggd_sampling_variance():
    j = ORACLES["J_ggd_sampling"]
    z = sample_ggd(T(0.0), T(j["alpha"]), T(j["beta"]), 400_000, generator=torch.Generator().manual_seed(0))
    assert float(z.var()) == pytest.approx(j["formula_var"], rel=0.01)


def test_mc_passes_use_dropout_only():
    torch.manual_seed(0)
    model = BayesCapMLP(BayesCapConfig(8, dropout=0.3)).double()
    x = torch.randn(5, 8, dtype=torch.float64)
    mu, h_a, h_b = mc_passes(model, x, 6)
    assert mu.shape == (6, 5, 8) and float(population_variance(mu).max()) > 0
    one = mc_passes(model, x, 1)[0]
    assert torch.equal(one[0], mc_passes(model, x, 1)[0][0]) and not model.training
    s = score_embeddings(model.float(), x.float().numpy(), passes=1)
    assert np.isneginf(s["log_u_epi"]).all() and np.allclose(s["log_u"], s["log_u_alea"])


def test_training_learns_per_record_noise():
    """Pairs of views of one latent; the view noise grows with the latent's first coordinate
    (something the network can see): log_u must follow the noise."""
    rng = np.random.default_rng(0)
    n, d = 800, 8
    latent = rng.normal(size=(n, d))
    sd = 0.02 + 0.4 / (1 + np.exp(-2 * latent[:, 0]))
    views = np.concatenate([latent + rng.normal(size=(n, d)) * sd[:, None] for _ in range(2)]).astype(np.float32)
    pairs = np.stack([np.arange(n), np.arange(n) + n], axis=1)
    model = BayesCapMLP(BayesCapConfig(d, dropout=0.05))
    log = train_bayescap(model, views, pairs[:640], pairs[640:], BayesCapTrainConfig(method="bayescap", steps=800, lr=1e-2, batch=128, val_every=100))
    assert log.history[-1][1] < log.history[0][1] and log.best_val_loss is not None
    s = score_embeddings(model, views[:n], passes=5)
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(s["log_u"]), rank(sd))[0, 1] > 0.5

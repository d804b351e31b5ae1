"""The hybrid method: neighbour blocks (training's exclusions), an exact closed-form density that
integrates to 1, the smoothed point, draws that follow the density, and a real train → predict
round trip whose checkpoint carries its gallery."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from geopipe.pipeline.core.errors import ConfigError
from geopipe.pipeline.infer.predictor import PredictOptions, load_predictor, predict_batch
from geopipe.pipeline.methods.hybrid import HybridMethod, hybrid_log_density, smoothed_log_score
from geopipe.pipeline.methods.registry import get_method, method_from_dict
from geopipe.pipeline.model.hybrid_net import HybridParams
from geopipe.pipeline.model.neighbours import neighbour_block, split_block
from geopipe.pipeline.model.network import NetworkConfig
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, fibonacci_sphere, latlon_to_xyz
from geopipe.pipeline.store.format import ShardStat
from geopipe.pipeline.store.reader import read_store
from geopipe.pipeline.store.writer import StoreWriter
from geopipe.pipeline.train.gallery import build_gallery, with_neighbours
from geopipe.stages.predict import PredictConfig, run_predict
from geopipe.stages.train import TrainConfig, run_train


def _kappa(width_km):
    return torch.as_tensor((EARTH_RADIUS_KM / np.asarray(width_km, dtype=np.float64)) ** 2)


def _unit(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, 3, generator=g, dtype=torch.float64), dim=-1)


def _chord(km):
    return 2.0 * math.sin(km / (2.0 * EARTH_RADIUS_KM))


def test_neighbour_block_is_the_brute_force_top_k_without_the_excluded_rows():
    rng = np.random.default_rng(0)
    gal = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(300, 16)), dtype=torch.float32), dim=-1).half()
    xyz = _unit(300, 1).float()
    groups = torch.arange(300)
    groups[:100] = 0  # one place of 100 rows: more than the extra candidates searched beyond k
    q_rows = torch.tensor([0, 5, 177])
    k = 10
    block = neighbour_block(gal[q_rows].float(), gal.float(), xyz, k, groups=groups[q_rows], gallery_groups=groups)
    nb_xyz, sim, valid, _ = split_block(block, k)
    sims = (torch.nn.functional.normalize(gal[q_rows].float(), dim=-1) @ gal.float().T).numpy()  # queries are made unit
    for i, r in enumerate(q_rows.tolist()):
        ok = (groups != groups[r]).numpy()
        want = np.argsort(-np.where(ok, sims[i], -np.inf), kind="stable")[:k]
        assert valid[i].all()
        np.testing.assert_allclose(sim[i].numpy(), sims[i][want], rtol=0, atol=1e-6)
        np.testing.assert_allclose(nb_xyz[i].numpy(), xyz[want].numpy(), atol=1e-6)
    # a gallery smaller than k: the missing slots are invalid and zero
    small = neighbour_block(gal[:3].float(), gal[:5].float(), xyz[:5], 8)
    _, s_sim, s_valid, _ = split_block(small, 8)
    assert s_valid.sum(1).tolist() == [5, 5, 5] and (s_sim[~s_valid] == 0).all()


def test_training_blocks_never_hold_the_record_or_its_own_place():
    emb = torch.as_tensor(np.random.default_rng(1).normal(size=(60, 8)), dtype=torch.float32)
    xyz = _unit(60, 2).float()
    step = torch.tensor([_chord(0.08), 0.0, 0.0])
    for i in range(10, 20):  # a place chained 80 m by 80 m: its ends are 720 m apart
        xyz[i] = torch.nn.functional.normalize(xyz[10] + (i - 10) * step, dim=0)
    c = with_neighbours(emb, build_gallery(emb, xyz), 8, 0.1, progress=False)
    assert c.shape == (60, 8 + 11 * 8)
    nb_xyz, _, valid, _ = split_block(c[:, 8:], 8)
    assert valid.all()
    for i in range(60):
        chained = (nb_xyz[i, :, None, :] - xyz[10:20][None]).norm(dim=-1).min(1).values < 1e-6
        assert (nb_xyz[i] - xyz[i]).norm(dim=-1).min() > 1e-6  # never itself
        assert not (10 <= i < 20 and chained.any())  # never its place


def _params(widths_km, weights, uniform):
    """One record's HybridParams: vMF components of the given widths at random means."""
    n = len(widths_km)
    log_w = torch.log(torch.tensor([*weights, uniform], dtype=torch.float64))[None]
    return HybridParams(mu=_unit(n, 3)[None].float(), kappa=_kappa(widths_km)[None], log_w=log_w)


def test_density_integrates_to_one_and_resolves_a_20_m_kernel():
    p = _params([300.0, 800.0, 3000.0], [0.5, 0.3, 0.15], 0.05)
    grid = fibonacci_sphere(400_000, dtype=torch.float64)
    rep = HybridParams(p.mu.expand(len(grid), -1, -1), p.kappa.expand(len(grid), -1), p.log_w.expand(len(grid), -1))
    mass = float(hybrid_log_density(grid, rep).exp().mean() * 4 * math.pi)
    assert abs(mass - 1.0) < 1e-3
    # a 20 m kernel: exact at its mean and 20 m away (float32 inputs), where 1 − cos underflows float32
    k = _kappa([0.02])
    sharp = HybridParams(mu=torch.tensor([[[0.0, 0.0, 1.0]]]), kappa=k[None], log_w=torch.log(torch.tensor([[1.0 - 1e-9, 1e-9]],
                                                                                                          dtype=torch.float64)))
    ang = 0.02 / EARTH_RADIUS_KM
    x = torch.tensor([[0.0, 0.0, 1.0], [math.sin(ang), 0.0, math.cos(ang)]], dtype=torch.float32)
    two = HybridParams(sharp.mu.expand(2, -1, -1), sharp.kappa.expand(2, -1), sharp.log_w.expand(2, -1))
    got = hybrid_log_density(x, two)
    want = torch.log(k) - math.log(2 * math.pi) - torch.tensor([0.0, 0.5]) * k * ang**2
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=2e-3 + 1e-9 * float(k))


def test_smoothed_score_is_the_expected_kernel_and_a_thin_spike_does_not_win():
    p = _params([200.0, 1500.0], [0.7, 0.25], 0.05)
    grid = fibonacci_sphere(1_000_000, dtype=torch.float64)  # quadrature: E f = 4π · mean(p f) over an even grid
    rep = HybridParams(p.mu.expand(len(grid), -1, -1), p.kappa.expand(len(grid), -1), p.log_w.expand(len(grid), -1))
    dens = hybrid_log_density(grid, rep).exp()
    cand = torch.cat([p.mu[0].double(), _unit(2, 9)])[None]
    ks = (EARTH_RADIUS_KM / 400.0) ** 2
    quad = 4 * math.pi * (dens[None] * torch.exp(ks * (cand[0] @ grid.T - 1.0))).mean(1)
    got = smoothed_log_score(cand, p, 400.0)[0].exp()
    np.testing.assert_allclose(got.numpy(), quad.numpy(), rtol=2e-3)
    # a 20 m spike of 5 % mass against a 10 km kernel of 90 %: the density peaks at the spike, the point does not
    q = HybridParams(mu=_unit(2, 4)[None].float(), kappa=_kappa([0.02, 10.0])[None],
                     log_w=torch.log(torch.tensor([[0.05, 0.9, 0.05]], dtype=torch.float64)))
    dens = hybrid_log_density(q.mu[0], HybridParams(q.mu.expand(2, -1, -1), q.kappa.expand(2, -1), q.log_w.expand(2, -1)))
    assert dens[0] > dens[1] and smoothed_log_score(q.mu, q, 25.0)[0].argmax() == 1


def _region_store(path, n_regions=40, per_region=6, d=24, seed=0, noise=0.05):  # regions: fixed (seed 7); records: seed
    """Records at their own places, a few in each of some 20 km-wide regions; embeddings encode the
    location (a fixed random smooth map of xyz plus noise), so a record's neighbours in embedding
    space are the other records of its region."""
    crng, rng = np.random.default_rng(7), np.random.default_rng(seed)
    centres = latlon_to_xyz(torch.as_tensor(np.stack([crng.uniform(-60, 60, n_regions), crng.uniform(-180, 179, n_regions)], 1),
                                            dtype=torch.float64)).numpy()
    proj = np.random.default_rng(99).normal(size=(3, d)) * 3.0
    idx = np.repeat(np.arange(n_regions), per_region)
    xyz = centres[idx] + rng.normal(scale=20.0 / EARTH_RADIUS_KM, size=(len(idx), 3))
    xyz /= np.linalg.norm(xyz, axis=1, keepdims=True)
    emb = np.sin(xyz @ proj) + noise * rng.normal(size=(len(idx), d))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    ll = np.degrees(np.stack([np.arcsin(xyz[:, 2]), np.arctan2(xyz[:, 1], xyz[:, 0])], 1))
    keys = [f"r{seed}-{i:05d}" for i in range(len(idx))]
    with StoreWriter.open(str(path), backbone={"name": "test", "pretrained": None}, embed_dim=d, dtype="float32") as w:
        w.append_shard("shard-0", emb, ll, keys, {}, [], ShardStat(1, 0.0))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    train = _region_store(root / "train.zarr")
    test = _region_store(root / "test.zarr", seed=1, per_region=1)  # new photos in the same regions
    out = str(root / "model")
    res = run_train(TrainConfig(store=train, out=out, method="hybrid", dim=32, steps=150, batch_size=64, warmup=10, val_every=150,
                                neighbours=8, seed=0, device="cpu", progress=False, resume=False))
    return {"train": train, "test": test, "out": out, "res": res}


def test_train_predict_round_trip_with_the_gallery_in_the_checkpoint(trained, tmp_path):
    p = load_predictor(trained["out"], torch.device("cpu"))
    assert p.method.name == "hybrid" and p.method.gallery_rows == 240 and p.method.neighbours == 8
    assert tuple(p.model.gallery_emb.shape) == (240, 24) and p.model.gallery_emb.dtype == torch.float16
    assert trained["res"].val_loss < math.log(4 * math.pi) - 6  # far below the uniform's ln 4π
    out = str(tmp_path / "p.parquet")
    run_predict(PredictConfig(checkpoint=trained["out"], store=trained["test"], out=out, nll=True, localizability=16, samples=4,
                              device="cpu", progress=False))
    t = pq.read_table(out).to_pandas()
    assert len(t) == 40 and np.isfinite(t["log_likelihood"]).all() and np.isfinite(t["effective_area_km2"]).all()
    # new records in the training regions: the points land in the region, the density is about its size
    assert t["distance_km"].median() < 60 and t["log_likelihood"].mean() > 5
    assert ((t["hdr_rank"] >= 0) & (t["hdr_rank"] <= 1)).all()
    # the 90 % region of a record: the grid's contour plus its sub-10-km kernels as discs, τ from its draws; the mass
    # is the share of 1,000 other draws inside (±0.0095): it holds what was asked
    st = read_store(trained["test"])
    cols = predict_batch(p, np.asarray(st.embeddings[:6]), np.asarray(st.latlon[:6]), [str(k) for k in st.keys[:6]],
                         PredictOptions(region=0.9), torch.Generator().manual_seed(0))
    mass, area = cols["region_mass"], cols["region_area_km2"]
    assert (np.abs(mass - 0.9) < 0.06).all() and abs(mass.mean() - 0.9) < 0.03 and (area > 0).all(), (mass, area)


def test_likelihood_of_repeated_rows_equals_row_by_row(trained):
    p = load_predictor(trained["out"], torch.device("cpu"))
    emb = np.asarray(read_store(trained["test"]).embeddings[:5])
    cond = p.condition(emb)
    x = p.method.sample(p.model, cond, 7, generator=torch.Generator().manual_seed(0))
    flat = cond.repeat_interleave(7, dim=0)
    fast = p.method.log_likelihood(p.model, x.reshape(-1, 3), flat)
    slow = torch.cat([p.method.log_likelihood(p.model, x.reshape(-1, 3)[i : i + 1], flat[i : i + 1]) for i in range(len(flat))])
    np.testing.assert_allclose(fast.numpy(), slow.numpy(), rtol=1e-3, atol=5e-3)  # float32 network: batch-shape rounding
    cols = predict_batch(p, emb, None, [f"k{i}" for i in range(5)], PredictOptions(), torch.Generator().manual_seed(0))
    assert np.isfinite(cols["lat"]).all()


def test_options_are_checked_and_recorded():
    m = get_method("hybrid", neighbours=16, exclude_km=0.5, gallery_rows=10)
    assert method_from_dict(m.to_dict()).to_dict() == m.to_dict() == {
        "name": "hybrid", "space": "sphere", "neighbours": 16, "components": 3, "scales": 3, "dropout": 0.5, "exclude_km": 0.5,
        "gallery_rows": 10,
        "calibration": None, "width_scale": 1.0, "weight_temperature": 1.0, "floor": 0.0}
    with pytest.raises(ConfigError, match="floor"):
        HybridMethod(floor=1.0)
    with pytest.raises(ConfigError, match="neighbours"):
        HybridMethod(neighbours=0)
    with pytest.raises(ConfigError, match="guidance"):
        HybridMethod(cond_drop=0.1)
    with pytest.raises(ConfigError, match="unknown option"):
        get_method("rfm", neighbours=3)
    with pytest.raises(ConfigError, match="in memory"):
        run_train(TrainConfig(store="x.zarr", out="y", method="hybrid", stream=True, progress=False))
    with pytest.raises(ConfigError, match="dropout"):
        HybridMethod(dropout=1.0)
    with pytest.raises(ConfigError, match=r"--val-store, --dropout: options of --method hybrid, not 'rfm'"):
        TrainConfig(store="x.zarr", out="y", method="rfm", val_store="v.zarr", dropout=0.1)


def test_dropout_acts_in_training_only():
    net = HybridMethod(neighbours=4, dropout=0.5).build_model(NetworkConfig(dim=16, depth=1, cond_dim=8))
    cond = torch.cat([torch.randn(5, 8), torch.zeros(5, 11 * 4)], 1)
    cond[:, 8 + 16 : 8 + 20] = 1.0  # every slot valid
    torch.manual_seed(0)
    net.train()
    a, b = net(cond).log_w, net(cond).log_w
    assert not torch.allclose(a, b)
    net.eval()
    torch.testing.assert_close(net(cond).log_w, net(cond).log_w)


def _one_kernel_params(n, width_km, seed):
    """n records, each one neighbour kernel of ``width_km`` (weight 0.998), one embedding component, a uniform."""
    mu = torch.cat([_unit(n, seed)[:, None, :], _unit(n, seed + 1)[:, None, :]], 1).float()
    log_w = torch.log(torch.tensor([[0.998, 0.001, 0.001]], dtype=torch.float64)).expand(n, 3)
    return HybridParams(mu=mu, kappa=_kappa(np.full((n, 2), width_km)), log_w=log_w)


def test_held_out_calibration_finds_a_similarity_dependent_width_and_is_exact_where_it_should_be():
    from geopipe.pipeline.methods.hybrid_calibration import HybridCalibration, fit_hybrid_calibration
    from geopipe.pipeline.sphere.vmf import sample_vmf

    n = 4000
    p = _one_kernel_params(n, 20.0, 11)
    sim = torch.linspace(0.5, 0.9, n, dtype=torch.float64)[torch.randperm(n, generator=torch.Generator().manual_seed(1))][:, None]
    valid = torch.ones(n, 1, dtype=torch.bool)
    z = (sim[:, 0] - sim.mean()) / sim.std()
    truth_km = 20.0 * 2.5 * torch.exp(0.5 * z)  # truths 2.5× wider than the kernels on average, wider still where the best match is closer
    x = sample_vmf(p.mu[:, 0].double(), _kappa(truth_km.numpy()), generator=torch.Generator().manual_seed(0))
    fit = fit_hybrid_calibration(p, sim, valid, x, scales=1, components=1)
    theta = fit.to_dict()["parameters"]
    assert math.exp(theta["log_width_scale_0"]) == pytest.approx(2.5, rel=0.05)
    assert theta["width_slope_top1"] == pytest.approx(0.5, abs=0.05) and theta["width_slope_gap"] == pytest.approx(0.0, abs=1e-6)
    assert fit.val_nll < fit.val_nll_before and fit.n_val == n
    q = HybridCalibration.from_dict(fit.to_dict(), 1, 1).apply(p, sim, valid)
    torch.testing.assert_close(q.log_w.exp().sum(1), torch.ones(n, dtype=torch.float64))  # still a density: weights sum to 1
    assert float(-hybrid_log_density(x, q).mean()) == pytest.approx(fit.val_nll, abs=1e-9)

    identity = HybridCalibration(1, 1, (0.0,) * len(fit.theta), (0.7, 0.1), (0.1, 1.0), 0.0, 0.0, 0)
    same = identity.apply(p, sim, valid)
    torch.testing.assert_close(same.kappa, p.kappa)
    torch.testing.assert_close(same.log_w, p.log_w)
    dead = HybridParams(p.mu, p.kappa, torch.cat([torch.full((n, 1), float("-inf"), dtype=torch.float64),
                                                  torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64)).expand(n, 2)], 1))
    assert torch.isinf(HybridCalibration.from_dict(fit.to_dict(), 1, 1).apply(dead, sim, valid).log_w[:, 0]).all()  # an empty slot stays empty
    with pytest.raises(ConfigError, match="3 kernels per neighbour"):
        HybridCalibration.from_dict(fit.to_dict(), 3, 1)
    with pytest.raises(ConfigError, match="not both"):
        HybridMethod(calibration=fit.to_dict(), scales=1, components=1, floor=0.1)


def test_older_checkpoints_three_number_calibration_still_applies():
    from geopipe.pipeline.methods.hybrid import calibrate_params

    n = 50
    p = _one_kernel_params(n, 20.0, 3)
    assert calibrate_params(p) is p
    q = calibrate_params(p, 2.0, 1.0, 0.1)
    torch.testing.assert_close(q.kappa, p.kappa / 4)
    torch.testing.assert_close(q.log_w.exp().sum(1), torch.ones(n, dtype=torch.float64))
    assert float(q.log_w[0, -1].exp()) == pytest.approx(0.1 + 0.9 * 0.001)


def test_train_with_a_val_store_records_the_fit_and_resumes(trained, tmp_path):
    from geopipe.pipeline.artifacts.checkpoint import load_checkpoint_config

    out = str(tmp_path / "cal")
    kw = dict(store=trained["train"], out=out, method="hybrid", dim=16, steps=20, batch_size=32, warmup=2, val_every=20, neighbours=4,
              seed=0, device="cpu", progress=False, val_store=trained["test"])
    run_train(TrainConfig(**kw))
    m = load_checkpoint_config(out)["method"]
    cal = m["calibration"]
    assert cal["n_val"] > 0 and cal["val_nll"] < cal["val_nll_before"] and (m["width_scale"], m["floor"]) == (1.0, 0.0)
    assert any(v != 0.0 for v in cal["parameters"].values())
    pred = load_predictor(out, torch.device("cpu"))
    assert pred.method.calibration.to_dict() == cal
    # predict scores with the calibrated density: its log-likelihood is the calibrated mixture's, not the network's
    st = read_store(trained["test"])
    emb, ll = np.asarray(st.embeddings[:8]), np.asarray(st.latlon[:8])
    cols = predict_batch(pred, emb, ll, [f"k{i}" for i in range(8)], PredictOptions(nll=True), torch.Generator().manual_seed(0))
    cond = pred.condition(emb)
    xt = latlon_to_xyz(torch.as_tensor(ll, dtype=torch.float64))
    _, sim, valid, _ = split_block(cond[:, pred.model.embed_dim :], pred.method.neighbours)
    want = hybrid_log_density(xt, pred.method.calibration.apply(pred.model(cond), sim, valid))
    raw = hybrid_log_density(xt, pred.model(cond))
    np.testing.assert_allclose(cols["log_likelihood"], want.detach().numpy(), rtol=1e-6, atol=1e-6)
    assert not np.allclose(cols["log_likelihood"], raw.detach().numpy(), atol=1e-3)
    again = run_train(TrainConfig(**kw))  # the same command again: nothing left to train, no "changed settings" refusal
    assert again.step == 20


def test_place_field_must_exist_and_names_the_store(trained, tmp_path):
    from geopipe.pipeline.core.errors import GeopipeError

    with pytest.raises(GeopipeError, match=r"train\.zarr has no metadata field 'place_id'.*--exclude-km"):
        run_train(TrainConfig(store=trained["train"], out=str(tmp_path / "m"), method="hybrid", dim=16, steps=2, warmup=1,
                              neighbours=4, place_field="place_id", device="cpu", progress=False))

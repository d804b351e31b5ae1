"""Methods / training objectives (docs/methods.md#models; the RFM interpolant against a reference value)."""

import math

import pytest
import torch

from geopipe.pipeline.methods.base import drop_condition
from geopipe.pipeline.methods.registry import METHODS, get_method, method_from_dict, rfm_interpolant
from geopipe.pipeline.model.network import NetworkConfig, VMFParams
from geopipe.pipeline.sphere.geometry import LOG_UNIFORM_SPHERE, NonFiniteError, latlon_to_xyz, project, sphere_exp, sphere_log, xyz_to_latlon

F64 = torch.float64
PARIS = latlon_to_xyz(torch.tensor([[48.8566, 2.3522]], dtype=F64))
NYC = latlon_to_xyz(torch.tensor([[40.7128, -74.0060]], dtype=F64))
NET = NetworkConfig(dim=32, depth=2, cond_dim=6)
TRAINABLE = [n for n in METHODS if n != "uniform"]


def test_rfm_interpolant_oracle():
    g = torch.tensor([0.3], dtype=F64)
    y, u = rfm_interpolant(PARIS, NYC, g)
    torch.testing.assert_close(y, torch.tensor([[0.5672357323, -0.2289310169, 0.7910968421]], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(xyz_to_latlon(y), torch.tensor([[52.2881315, -21.9785404]], dtype=F64), rtol=0, atol=1e-6)
    torch.testing.assert_close(u, torch.tensor([[-0.3762157898, -0.8349431433, 0.0281364493]], dtype=F64), rtol=0, atol=1e-9)
    assert u.norm().item() == pytest.approx(0.9162205154, abs=1e-9)
    assert abs((y * u).sum().item()) < 1e-12
    torch.testing.assert_close(u, sphere_log(y, NYC) / (1 - 0.3), rtol=0, atol=1e-10)
    v, h = sphere_log(PARIS, NYC), 1e-6
    fd = (sphere_exp(PARIS, (0.3 + h) * v) - sphere_exp(PARIS, (0.3 - h) * v)) / (2 * h)
    torch.testing.assert_close(u, fd, rtol=0, atol=1e-8)


class _Record(torch.nn.Module):
    """Returns zeros and records its inputs, so the loss equals mean(target²)."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, y, gamma, cond):
        self.seen = (y, gamma, cond)
        return torch.zeros_like(y)


@pytest.mark.parametrize("name", ["rfm", "flow", "diffusion"])
def test_loss_matches_spec_targets(name):
    # γ = 0.9(1 − t) ≤ 0.9 keeps the target well-conditioned when rebuilt from (y, γ, x) below
    method = get_method(name, schedule="linear", schedule_params={"start": 0.9}, cond_drop=0.5)
    x = project(torch.randn(4000, 3, dtype=F64, generator=torch.Generator().manual_seed(0)))
    cond = torch.randn(4000, 6, dtype=F64) + 3.0
    rec = _Record()
    loss = method.loss(rec, x, cond, generator=torch.Generator().manual_seed(1))
    y, g, c = rec.seen
    assert g.shape == (4000,) and g.min() > 0 and g.max() <= 0.9 and g.unique().numel() == 4000
    assert (g < 0.3).any() and (g > 0.6).any()  # t ~ U[0, 1) per sample
    gc = g[:, None]
    if name == "rfm":  # y on the geodesic, target log_y(x)/(1−γ); loss ‖·‖²/3
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(4000, dtype=F64))
        target = sphere_log(y, x) / (1 - gc)
    elif name == "flow":  # y = γx + (1−γ)ε, target x − ε
        target = x - (y - gc * x) / (1 - gc)
    else:  # y = √γ x + √(1−γ) ε, target ε
        target = (y - gc.sqrt() * x) / (1 - gc).sqrt()
    torch.testing.assert_close(loss, (target**2).mean(), rtol=1e-9, atol=0)
    dropped = (c == 0).all(dim=-1)
    assert torch.equal(c[~dropped], cond[~dropped])
    assert abs(dropped.double().mean().item() - 0.5) < 0.05


def test_drop_condition_rate_and_zero_rows():
    c = torch.randn(20000, 5) + 10
    out = drop_condition(c, 0.1, torch.Generator().manual_seed(0))
    z = (out == 0).all(dim=-1)
    assert abs(z.float().mean().item() - 0.1) < 0.01
    assert torch.equal(out[~z], c[~z])
    assert drop_condition(c, 0.0, None) is c


def _toy(n=512, seed=0):
    """Conditional toy data: the one-hot class picks one of 3 cities."""
    g = torch.Generator().manual_seed(seed)
    centers = latlon_to_xyz(torch.tensor([[48.9, 2.4], [40.7, -74.0], [-33.9, 151.2]]))
    lab = torch.randint(0, 3, (n,), generator=g)
    x = project(centers[lab] + 0.05 * torch.randn(n, 3, generator=g))
    cond = torch.nn.functional.one_hot(lab, 6).float()
    return x, cond


def _built(name):
    """The method and its network; a gallery method (hybrid) gets a seeded 30-row gallery, and its
    conditioning is the embedding followed by the neighbour block (``method.condition``)."""
    method = get_method(name, **({"gallery_rows": 30, "neighbours": 4} if name == "hybrid" else {}))
    model = method.build_model(NET)
    if method.needs_gallery:
        g = torch.Generator().manual_seed(5)
        model.gallery_emb.copy_(torch.nn.functional.normalize(torch.randn(30, 6, generator=g), dim=-1).half())
        model.gallery_xyz.copy_(project(torch.randn(30, 3, generator=g)))
    return method, model, lambda cond: method.condition(model, cond, cond)


@pytest.mark.parametrize("name", TRAINABLE)
def test_loss_finite_and_decreases(name):
    torch.manual_seed(0)
    method, model, condition = _built(name)
    x, cond = _toy()
    cond = condition(cond)
    fixed = lambda: method.loss(model, x, cond, generator=torch.Generator().manual_seed(123))
    before = fixed().item()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    for _ in range(30):
        loss = method.loss(model, x, cond, generator=g)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed().item()
    assert math.isfinite(before) and after < before, (before, after)


@pytest.mark.parametrize("name", list(METHODS))
def test_predict_and_sample_are_unit_vectors(name):
    torch.manual_seed(0)
    method, model, condition = _built(name)
    _, cond = _toy(8)
    cond = condition(cond)
    g = torch.Generator().manual_seed(0)
    p = method.predict_point(model, cond, steps=4, generator=g)
    s = method.sample(model, cond, 5, steps=4, generator=g)
    assert p.shape == (8, 3) and s.shape == (8, 5, 3)
    for out in (p, s):
        assert torch.isfinite(out).all() and not out.requires_grad
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(out.shape[:-1]))


class _Const(torch.nn.Module):
    def __init__(self, value, bad_row=None):
        super().__init__()
        self.value, self.bad_row = value, bad_row

    def forward(self, y, gamma, cond):
        out = torch.full_like(y, 1e30 if self.value is None else 0.0)
        if self.bad_row is not None:
            out[self.bad_row % len(y)] = self.value
        return out


@pytest.mark.parametrize("name", ["rfm", "flow", "diffusion"])
def test_huge_output_projected_and_nonfinite_raises(name):
    method = get_method(name)
    cond = torch.zeros(4, 6)
    if method.space == "r3":  # projection onto S²: a huge but finite R³ point (‖x‖² overflows float32) is projected
        p = method.predict_point(_Const(None), cond, steps=3)
        torch.testing.assert_close(p.norm(dim=-1), torch.ones(4))
    bad = float("nan") if name == "diffusion" else float("inf")  # DDIM's cube clamp maps ±inf into [−1, 1]
    with pytest.raises(NonFiniteError, match="record #2"):
        method.predict_point(_Const(bad, bad_row=2), cond, steps=3, guidance=0.0)
    with pytest.raises(NonFiniteError, match="record 'img-1' \\(sample 1\\)"):
        method.sample(_Const(bad, bad_row=3), cond[:2], 2, steps=3, keys=["img-0", "img-1"])


class _FixedVMF(torch.nn.Module):
    def __init__(self, mu, kappa, weights):
        super().__init__()
        self.p = (mu, kappa, weights)

    def forward(self, cond):
        b = cond.shape[0]
        mu, k, w = self.p
        return VMFParams(mu.expand(b, *mu.shape[1:]), k.expand(b, -1), w.expand(b, -1))


def test_vmf_methods_closed_forms_and_modes():
    one = _FixedVMF(PARIS[None], torch.tensor([[10.0]], dtype=F64), torch.ones(1, 1, dtype=F64))
    cond = torch.zeros(2, 6, dtype=F64)
    vmf = get_method("vmf")
    lp = vmf.log_likelihood(one, torch.cat((PARIS, NYC)), cond)
    torch.testing.assert_close(lp, torch.tensor([0.4647080096, -3.4470641242], dtype=F64), rtol=0, atol=1e-9)
    torch.testing.assert_close(vmf.predict_point(one, cond), PARIS.expand(2, 3))
    mix = _FixedVMF(torch.cat((PARIS, NYC, torch.tensor([[0.0, 0, 1]], dtype=F64)))[None],
                    torch.tensor([[10.0, 100.0, 1.0]], dtype=F64), torch.tensor([[0.5, 0.3, 0.2]], dtype=F64))
    m = get_method("vmf_mixture")
    assert -m.log_likelihood(mix, PARIS, cond[:1]).item() == pytest.approx(0.1929383536, abs=1e-9)
    torch.testing.assert_close(m.predict_point(mix, cond), NYC.expand(2, 3))  # κ 100 beats weight 0.5
    with pytest.raises(ValueError, match="does not apply"):
        m.sample(mix, cond, 3, sampler="euler")


def test_uniform_method():
    u = get_method("uniform")
    model = u.build_model(NET)
    assert not u.trainable and len(list(model.parameters())) == 0
    x = project(torch.randn(5, 3, dtype=F64))
    cond = torch.zeros(5, 6, dtype=F64)
    assert torch.equal(u.log_likelihood(model, x, cond), torch.full((5,), LOG_UNIFORM_SPHERE, dtype=F64))
    assert u.loss(model, x, cond).item() == pytest.approx(math.log(4 * math.pi))
    s = u.sample(model, cond, 20000, generator=torch.Generator().manual_seed(0))
    assert s.reshape(-1, 3).mean(0).abs().max() < 0.01  # centred: uniform draws


@pytest.mark.parametrize("name", list(METHODS))
def test_to_dict_round_trip(name):
    opts = {"schedule": "linear", "cond_drop": 0.2} if name in ("rfm", "flow", "diffusion") else {}
    if name == "flow":
        opts["sampler"] = "heun"
    m = get_method(name, **opts)
    d = m.to_dict()
    assert d["name"] == name and d["space"] == ("r3" if name in ("flow", "diffusion") else "sphere")
    again = method_from_dict(d)
    assert again.to_dict() == d and type(again) is type(m)


def test_registry_errors():
    with pytest.raises(ValueError, match=r"unknown method 'rmf'; choose one of \['diffusion'"):
        get_method("rmf")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\]"):
        get_method("rfm", steps=3)
    with pytest.raises(ValueError, match="'euler' is for r3"):
        get_method("rfm", sampler="euler")
    with pytest.raises(ValueError, match="'riemann_euler' is for sphere"):
        get_method("flow").predict_point(_Const(0.0), torch.zeros(1, 6), sampler="riemann_euler")
    with pytest.raises(ValueError, match="space 'sphere' but 'flow'"):
        method_from_dict({"name": "flow", "space": "sphere"})
    with pytest.raises(ValueError, match="cond_drop"):
        get_method("rfm", cond_drop=1.0)

"""Exact log-likelihoods by the instantaneous change of variables
(docs/methods.md#likelihood).

The augmented state s = [x, ℓ] (B, D+1) is integrated with ``torchdiffeq.odeint`` from the data
end t = 0 to the noise end t = 1 with dx/dt = f(x, t), dℓ/dt = div f(x, t), and
log p(x_data) = log p_base(x(1)) + ℓ(1)   (nats; per unit volume in R³, per steradian on S²).

``field(y (B, D), γ (B,)) -> (B, D)`` is the (guided) network output: a γ-velocity ψ for flow
models, ε̂ for diffusion. Jacobians are exact and batched: forward-mode JVPs along the D basis
directions, vmapped (≈ 4–5 network forwards of cost per ODE evaluation, measured on CPU), or one
Rademacher probe (Hutchinson, ``hutchinson=True``). Both assume records do not interact inside
the network (true for per-sample MLP/LayerNorm networks). Time-like quantities (t, γ, γ') are
computed in float64 and cast to the state dtype. Safe to call under ``torch.no_grad`` or
``torch.inference_mode`` callers.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch
from torch.func import jvp, vmap

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.model.guidance import Field
from geopipe.pipeline.model.schedules import Schedule
from geopipe.pipeline.sphere.geometry import LOG_UNIFORM_SPHERE, project

__all__ = [
    "field_jacobian",
    "sphere_divergence",
    "gaussian_log_density",
    "euclidean_log_likelihood",
    "diffusion_log_likelihood",
    "sphere_log_likelihood",
    "as_autograd_tensor",
    "ADAPTIVE_SOLVERS",
]

#: torchdiffeq's adaptive solvers, whose steps follow ``rtol``/``atol`` (the ``method`` of the
#: likelihood functions; fixed-step ones such as rk4 need a step size instead). On a trained
#: demo RFM model bosh3 needs half the evaluations of dopri5 for the same accuracy (README).
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")


def field_jacobian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Value fn(x) (B, D) and per-record Jacobians J (B, D, D), J[b, i, j] = ∂fn_i/∂x_j at x_b.

    One vmapped forward-mode pass over the D basis tangents (records must not interact).
    """
    b, d = x.shape
    basis = torch.eye(d, dtype=x.dtype, device=x.device)[:, None, :].expand(d, b, d)
    with _no_jit_script_warning():
        val, cols = vmap(lambda v: jvp(fn, (x,), (v,)))(basis)
    return val[0], cols.permute(1, 2, 0)


@contextlib.contextmanager
def _no_jit_script_warning():
    """torch's forward-mode AD (jvp) scripts its JVP decompositions on first use and warns that
    torch.jit.script is deprecated: torch's own internals, nothing a user can act on. Silenced
    around geopipe's jvp calls only (the warning filters are restored on exit)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        yield


def sphere_divergence(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ψ̃(x) (B, 3) and the surface divergence of its tangent part at unit x (B, 3), (B,).

    div_S(Pψ̃)(x) = tr J − xᵀ J x − 2 xᵀψ̃(x), J = ∂ψ̃/∂x the ambient 3×3 Jacobian; e.g. ψ̃ = a
    (constant) gives −2 x·a, ψ̃ = x or ψ̃ = ω × x give 0.
    """
    val, jac = field_jacobian(fn, x)
    tr = jac.diagonal(dim1=-2, dim2=-1).sum(-1) - torch.einsum("bi,bij,bj->b", x, jac, x)
    return val, tr - 2.0 * (x * val).sum(-1)


def gaussian_log_density(x: torch.Tensor) -> torch.Tensor:
    """log N(x; 0, I_D) = −½‖x‖² − (D/2) ln 2π, (B, D) → (B,)."""
    return -0.5 * (x * x).sum(dim=-1) - 0.5 * x.shape[-1] * math.log(2.0 * math.pi)


def as_autograd_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy usable by autograd/forward-AD when t was made under ``torch.inference_mode``."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


def _probe(x: torch.Tensor, generator) -> torch.Tensor:
    r = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return as_autograd_tensor((2 * r - 1).to(x.dtype))


def _value_and_trace(fn, x, probe, left=None):
    """(value (B,D), tr J (B,)) exactly, or the Hutchinson estimate (left(v))ᵀ J v with a probe v."""
    if probe is None:
        val, jac = field_jacobian(fn, x)
        return val, jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    with _no_jit_script_warning():
        val, jv = jvp(fn, (x,), (probe,))
    return val, ((probe if left is None else left(probe)) * jv).sum(-1)


def _solve(func, x: torch.Tensor, t0: float, t1: float, rtol, atol, method, options) -> torch.Tensor:
    """Integrate the augmented state from t0 to t1; returns the final state (B, D+1)."""
    from torchdiffeq import odeint

    state0 = torch.cat((x, torch.zeros_like(x[:, :1])), dim=-1)
    t = torch.tensor([t0, t1], dtype=torch.float64, device=x.device)
    with torch.inference_mode(False), torch.no_grad():
        try:
            return odeint(func, state0, t, rtol=rtol, atol=atol, method=method, options=options)[-1]
        except AssertionError as exc:  # torchdiffeq signals a step-size underflow with an assert
            raise GeopipeError(
                f"likelihood ODE failed ({exc}): the field is too stiff for {method} at rtol={rtol}, atol={atol}; "
                "try other tolerances or a fixed-step method"
            ) from None


def _time(schedule: Schedule, t: torch.Tensor):
    t64 = t.to(torch.float64).reshape(())
    return schedule.gamma(t64), schedule.dgamma(t64)


def euclidean_log_likelihood(
    field: Field, x: torch.Tensor, schedule: Schedule, *, rtol: float = 1e-5, atol: float = 1e-5,
    method: str = "dopri5", options: dict | None = None, hutchinson: bool = False, generator=None,
) -> torch.Tensor:
    """Euclidean flow matching: f = γ'(t) ψ(x, γ(t)), base N(0, I_D). x (B, D) → (B,) nats."""
    x = as_autograd_tensor(x)
    probe = _probe(x, generator) if hutchinson else None
    d = x.shape[-1]

    def func(t, s):
        g, dg = _time(schedule, t)
        y = s[:, :d]
        gb = g.to(y.dtype).expand(y.shape[0])
        val, tr = _value_and_trace(lambda z: field(z, gb), y, probe)
        c = dg.to(y.dtype)
        return torch.cat((c * val, (c * tr).unsqueeze(-1)), dim=-1)

    s1 = _solve(func, x, 0.0, 1.0, rtol, atol, method, options)
    return gaussian_log_density(s1[:, :d]) + s1[:, d]


def diffusion_log_likelihood(
    field: Field, x: torch.Tensor, schedule: Schedule, *, rtol: float = 1e-5, atol: float = 1e-5,
    t_min: float = 1e-5, t_max: float = 1.0, method: str = "dopri5", options: dict | None = None,
    hutchinson: bool = False, generator=None,
) -> torch.Tensor:
    """VP probability-flow likelihood for ε-prediction models, base N(0, I_D)
    (docs/methods.md#likelihood-spaces).

    In scheduler time the field is dx/dt = −½β x + ½β ε̂/√(1−γ), β = −γ'/γ, with ᾱ = γ. It is
    singular at both ends (1/√(1−γ) at the data end, β ≈ 1/(1−t) at the noise end), which made
    adaptive solvers crawl (thousands of evaluations) or underflow on trained models. The ODE only
    depends on t through γ, so it is integrated in the negative log-SNR τ = ln((1−γ)/γ) instead,
    where with σ² = 1−γ = sigmoid(τ)

        dx/dτ = ½ (σ ε̂ − σ² x),        dℓ/dτ = ½ (σ tr ∂ε̂/∂x − σ² D),

    bounded at both ends: the same trajectory and the same ∫div, without the stiffness. The
    endpoints are those of the schedule: from γ(t_min) (default t_min = 1e-5, 1 − γ ≈ 1e-7 for the
    skewed sigmoid; the omitted piece is O(σ(t_min)) ≈ 3e-4 in x) to γ(t_max) = γ(1) = 1e-9. The
    N(0, I) base is exact only up to O(√γ(1)) ≈ 3e-5 nats (the VP marginal at γ = 1e-9 has mean
    √γ·x̄). Checked against the closed form for Gaussian data (tests/test_likelihood.py).
    """
    x = as_autograd_tensor(x)
    probe = _probe(x, generator) if hutchinson else None
    d = x.shape[-1]

    def tau_of(t: float) -> float:
        g = float(schedule.gamma(torch.tensor(t, dtype=torch.float64)))
        return math.log1p(-g) - math.log(g)

    def func(tau, s):
        tau64 = tau.to(torch.float64).reshape(())
        g, var = torch.sigmoid(-tau64), torch.sigmoid(tau64)  # γ and σ² = 1 − γ, no cancellation
        y = s[:, :d]
        eps, tr = _value_and_trace(lambda z: field(z, g.to(y.dtype).expand(y.shape[0])), y, probe)
        sig, var = (0.5 * var.sqrt()).to(y.dtype), (0.5 * var).to(y.dtype)
        return torch.cat((sig * eps - var * y, (sig * tr - var * d).unsqueeze(-1)), dim=-1)

    s1 = _solve(func, x, tau_of(t_min), tau_of(t_max), rtol, atol, method, options)
    return gaussian_log_density(s1[:, :d]) + s1[:, d]


def sphere_log_likelihood(
    field: Field, x: torch.Tensor, schedule: Schedule, *, rtol: float = 1e-5, atol: float = 1e-5,
    reference_ambient: bool = False, method: str = "dopri5", options: dict | None = None,
    hutchinson: bool = False, generator=None,
) -> torch.Tensor:
    """Riemannian likelihood on S²: x (B, 3) unit → (B,) nats per steradian
    (docs/methods.md#likelihood-spaces).

    f = γ'(t) P(x̂) ψ̃(x̂) with x̂ = x/‖x‖ (the state is re-projected at every evaluation) and
    dℓ/dt = γ'(t) (tr J − x̂ᵀ J x̂ − 2 x̂ᵀ ψ̃), J = ∂ψ̃/∂x (ambient 3×3) at x̂; base −ln 4π.
    ``reference_ambient=True`` reproduces the reference implementation instead: f = γ'ψ
    unprojected, ambient tr J, no re-projection (for comparing with published numbers only).
    """
    x = as_autograd_tensor(project(x))
    probe = _probe(x, generator) if hutchinson else None

    def func(t, s):
        g, dg = _time(schedule, t)
        c = dg.to(s.dtype)
        gb = g.to(s.dtype).expand(s.shape[0])
        fn = lambda z: field(z, gb)  # noqa: E731
        if reference_ambient:
            val, tr = _value_and_trace(fn, s[:, :3], probe)
            return torch.cat((c * val, (c * tr).unsqueeze(-1)), dim=-1)
        xh = project(s[:, :3])
        tangent = lambda u: u - (xh * u).sum(-1, keepdim=True) * xh  # noqa: E731
        if probe is None:
            val, div = sphere_divergence(fn, xh)
        else:  # E[(Pv)ᵀ J v] = tr(PJ) = tr J − xᵀJx
            val, tr = _value_and_trace(fn, xh, probe, tangent)
            div = tr - 2.0 * (xh * val).sum(-1)
        return torch.cat((c * tangent(val), (c * div).unsqueeze(-1)), dim=-1)

    s1 = _solve(func, x, 0.0, 1.0, rtol, atol, method, options)
    return LOG_UNIFORM_SPHERE + s1[:, 3]

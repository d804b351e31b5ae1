"""A calibrated retrieval density on S², fitted on held-out queries (docs/retrieval_uncertainty.md, 1. Retrieval).

For a query with top-K neighbours at μ_k (unit vectors) and descriptor distances d_k:

    p(x) = Σ_{s=1..3} π_s Σ_k w_k vMF(x; μ_k, κ_s)  +  π_b Σ_k (1/K) vMF(x; μ_k, κ_b)  +  π_u / 4π   (per sr)

* weights ``w = softmax(−d / T)`` of the descriptor distances;
* three scales on those neighbours: a **per-query concentration** ``ln κ₁ = a + b·z_q``, z_q the
  query's standardised similarity features — the top-1 distance d₁ and the gap d₁₀ − d₁ to its
  10th neighbour (a close, distinct best match earns a sharper kernel) — and two wider ones,
  κ₂ = κ₁e^{−δ₂}, κ₃ = κ₂e^{−δ₃} (place-level errors are heavy-tailed: one Gaussian width
  cannot hold both the right street and the right city);
* a broad part: the same neighbours, equal weights, one broad concentration κ_b (the right
  region when the best matches are the wrong place);
* a uniform floor π_u (no truth is ever impossible).

Share logits (0, ρ₂ + c₂·z_q, ρ₃, ρ_b + c_b·z_q, ρ_u): how much goes to the wider scales and the
broad part depends on the query too. The fifteen parameters (:data:`PARAMETERS`) minimise the
mean NLL (nats/sr) of the true positions of **held-out queries** — a validation store searched
against the database, or database records queried leave-capture-out — by L-BFGS from the best
points of a small grid. The old fit (:func:`geopipe.pipeline.retrieval.density.fit_kernel`: one
κ, database against itself, no tail) picks a kernel far too broad for queries that are not in
the database.

The density is a vMF mixture of 4K + 1 components per query (the floor as κ → 0), so sampling,
localizability and HDR ranks follow exactly, and the point prediction is the neighbour with the
highest expected GeoScore under it (:func:`calibrated_columns`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.eval.metrics import GEOSCORE_SCALE_KM
from geopipe.pipeline.infer.localizability import localizability_from_logp
from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM, latlon_to_xyz, xyz_to_latlon
from geopipe.pipeline.sphere.vmf import sample_vmf_mixture

__all__ = ["PARAMETERS", "CalibratedKernel", "fit_calibrated", "calibrated_log_density", "calibrated_columns"]

#: Names of θ, in order.
PARAMETERS = ("log_kappa", "kappa_slope_d1", "kappa_slope_gap", "log_temperature",
              "medium_log_ratio", "medium_logit", "medium_slope_d1", "medium_slope_gap", "wide_log_ratio", "wide_logit",
              "log_kappa_broad", "broad_logit", "broad_slope_d1", "broad_slope_gap", "uniform_logit")
_SHARES = ("sharp", "medium", "wide", "broad", "uniform")
_LOG_4PI = math.log(4.0 * math.pi)
_KAPPA_UNIFORM = 1e-9  # the floor as a vMF component when sampling (Wood's sampler is exactly uniform as κ → 0)
_LOG_KAPPA = (-2.0, 23.0)  # κ in [0.14, 1e10] 1/rad²: widths from 17,000 km down to 0.06 km
_GRID_WIDTH_KM = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
_GRID_T = (0.01, 0.03, 0.1, 0.3, math.inf)
_GAP_RANK = 9  # 0-based rank of the gap feature's neighbour (the last valid one when K is smaller)
_ENTRIES = 2**20  # (query, point, neighbour) triples per tile of the density


@dataclass(frozen=True)
class CalibratedKernel:
    """θ (:data:`PARAMETERS`; κ in 1/rad², T in descriptor-distance units, inf = equal weights),
    the feature standardisation (mean, std of (d₁, d₁₀ − d₁)), the held-out NLL ``val_nll``
    (nats/sr) on ``n_val`` queries and where they came from (``source``)."""

    theta: tuple[float, ...]
    feature_mean: tuple[float, float]
    feature_std: tuple[float, float]
    val_nll: float
    n_val: int
    source: str = "held-out queries"

    def param(self, name: str) -> float:
        return self.theta[PARAMETERS.index(name)]

    @property
    def width_km(self) -> float:
        """Sharp width R_E/√κ_q (km) of a query with mean features."""
        return EARTH_RADIUS_KM * math.exp(-0.5 * self.param("log_kappa"))

    @property
    def temperature(self) -> float:
        return math.exp(self.param("log_temperature"))

    def summary(self) -> dict:
        """JSON-ready description: θ by name, widths (km) and shares of a query with mean features."""
        logits = [0.0, self.param("medium_logit"), self.param("wide_logit"), self.param("broad_logit"), self.param("uniform_logit")]
        e = [math.exp(v - max(logits)) for v in logits]
        medium = self.width_km * math.exp(0.5 * self.param("medium_log_ratio"))
        return {"calibrated": True, "source": self.source, "val_nll": self.val_nll, "n_val": self.n_val, "width_km": self.width_km,
                "medium_width_km": medium, "wide_width_km": medium * math.exp(0.5 * self.param("wide_log_ratio")),
                "broad_width_km": EARTH_RADIUS_KM * math.exp(-0.5 * self.param("log_kappa_broad")), "temperature": self.temperature,
                "shares": dict(zip(_SHARES, (v / sum(e) for v in e))),
                "theta": dict(zip(PARAMETERS, self.theta)), "feature_mean": list(self.feature_mean), "feature_std": list(self.feature_std)}


def _log_vmf(cos: torch.Tensor, kappa: torch.Tensor) -> torch.Tensor:
    """log vMF density on S² (per sr) at ⟨μ, x⟩ = cos: ln κ − ln 2π − ln(1 − e^{−2κ}) + κ(cos − 1), exact for all κ > 0."""
    return torch.log(kappa) - math.log(2 * math.pi) - torch.log(-torch.expm1(-2.0 * kappa)) + kappa * (cos - 1.0)


def _features(d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(Q, 2) features (d₁, d_r − d₁) of distances d (Q, K), r the 10th or last valid neighbour."""
    last = (valid.sum(dim=1) - 1).clamp(min=0, max=_GAP_RANK)
    return torch.stack([d[:, 0], d.gather(1, last[:, None])[:, 0] - d[:, 0]], dim=1)


def _parts(d: torch.Tensor, valid: torch.Tensor, theta: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Per-query log weights (Q, K), log equal weights, log κ of the three weighted scales (Q,) and
    of the broad part, and log π (5, Q) in the order of ``_SHARES``, for parameters θ."""
    t = dict(zip(PARAMETERS, theta))
    z = (_features(d, valid) - stats[0]) / stats[1]
    slope = lambda name: z[:, 0] * t[f"{name}_slope_d1"] + z[:, 1] * t[f"{name}_slope_gap"]  # noqa: E731
    log_k1 = (t["log_kappa"] + slope("kappa")).clamp(*_LOG_KAPPA)
    log_k2 = (log_k1 - t["medium_log_ratio"]).clamp(*_LOG_KAPPA)
    logits = torch.zeros_like(d) if torch.isinf(t["log_temperature"]) else -torch.nan_to_num(d, nan=0.0) * torch.exp(-t["log_temperature"])
    rho = [torch.zeros_like(log_k1), t["medium_logit"] + slope("medium"), t["wide_logit"].expand_as(log_k1),
           t["broad_logit"] + slope("broad"), t["uniform_logit"].expand_as(log_k1)]
    return {"log_w": torch.log_softmax(logits.masked_fill(~valid, -math.inf), dim=1),
            "log_eq": torch.log_softmax(torch.zeros_like(d).masked_fill(~valid, -math.inf), dim=1),
            "log_k": (log_k1, log_k2, (log_k2 - t["wide_log_ratio"]).clamp(*_LOG_KAPPA)),
            "log_kb": t["log_kappa_broad"].clamp(*_LOG_KAPPA), "log_pi": torch.log_softmax(torch.stack(rho), dim=0)}


def _log_p(cos: torch.Tensor, p: dict) -> torch.Tensor:
    """log p at points with cosines ``cos`` (Q, S, K) to the neighbours → (Q, S) nats/sr."""
    terms = [torch.logsumexp(p["log_w"][:, None] + _log_vmf(cos, torch.exp(lk)[:, None, None]), dim=-1) for lk in p["log_k"]]
    terms.append(torch.logsumexp(p["log_eq"][:, None] + _log_vmf(cos, torch.exp(p["log_kb"])), dim=-1))
    terms.append(torch.full_like(terms[0], -_LOG_4PI))
    return torch.logsumexp(torch.stack([p["log_pi"][i][:, None] + v for i, v in enumerate(terms)]), dim=0)


def _tensors(nb_latlon, distances, indices):
    """(μ (Q, K, 3), d (Q, K) float64 NaN where missing, valid (Q, K) bool)."""
    valid = torch.from_numpy(np.asarray(indices) >= 0)
    mu = latlon_to_xyz(torch.from_numpy(np.nan_to_num(np.asarray(nb_latlon, dtype=np.float64))))
    return mu, torch.from_numpy(np.asarray(distances, dtype=np.float64)).masked_fill(~valid, math.nan), valid


def fit_calibrated(blocks, source: str = "held-out queries", max_iter: int = 200) -> CalibratedKernel:
    """Fit on held-out queries given block by block as (true positions (V, 2) degrees, neighbour
    positions (V, K, 2) degrees, descriptor distances (V, K), neighbour indices (V, K), −1 = none)."""
    cos, d, valid = [], [], []
    for tl, nb, dist, idx in blocks:
        tl = np.asarray(tl, dtype=np.float64)
        ok = np.isfinite(tl).all(axis=1) & (np.asarray(idx) >= 0).any(axis=1)
        mu, dd, vv = _tensors(np.asarray(nb)[ok], np.asarray(dist)[ok], np.asarray(idx)[ok])
        cos.append((mu * latlon_to_xyz(torch.from_numpy(tl[ok]))[:, None]).sum(-1).clamp(-1.0, 1.0))
        d.append(dd)
        valid.append(vv)
    if not sum(c.shape[0] for c in cos):
        raise GeopipeError("calibrated retrieval density: no held-out query with a known position and a neighbour to fit on")
    cos, d, valid = torch.cat(cos)[:, None, :], torch.cat(d), torch.cat(valid)
    f = _features(d, valid)
    stats = (f.mean(dim=0), f.std(dim=0).nan_to_num(1.0).clamp_min(1e-6))
    nll = lambda th: -_log_p(cos, _parts(d, valid, th, stats))[:, 0].mean()  # noqa: E731
    start = dict.fromkeys(PARAMETERS, 0.0)
    start.update(medium_log_ratio=3.0, wide_log_ratio=2.0, wide_logit=-1.0, log_kappa_broad=2 * math.log(EARTH_RADIUS_KM / 1000.0),
                 broad_logit=math.log(0.1), uniform_logit=math.log(0.01))
    grid = [torch.tensor([{**start, "log_kappa": 2 * math.log(EARTH_RADIUS_KM / w), "log_temperature": math.log(t)}[n] for n in PARAMETERS],
                         dtype=torch.float64) for w in _GRID_WIDTH_KM for t in _GRID_T]
    with torch.no_grad():
        starts = sorted(grid, key=lambda th: float(nll(th)))[:3]
    best = None
    for th0 in starts:
        th = _lbfgs(nll, th0, max_iter)
        value = float(nll(th))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, th)
    return CalibratedKernel(theta=tuple(best[1].tolist()), feature_mean=tuple(stats[0].tolist()), feature_std=tuple(stats[1].tolist()),
                            val_nll=best[0], n_val=int(d.shape[0]), source=source)


def _lbfgs(nll, th0: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Minimise nll(θ) from θ₀; infinite entries (T = inf: equal weights) stay fixed."""
    free = torch.isfinite(th0)
    x = th0[free].clone().requires_grad_(True)
    where = free.nonzero()[:, 0]
    full = lambda: th0.masked_fill(free, 0.0).index_put((where,), x)  # noqa: E731
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = nll(full())
        loss.backward()
        return loss

    opt.step(closure)
    return full().detach()


def calibrated_log_density(fit: CalibratedKernel, x: torch.Tensor, nb_latlon: np.ndarray, distances: np.ndarray,
                           indices: np.ndarray) -> torch.Tensor:
    """log p of points x (Q, S, 3) under each query's density (neighbour positions (Q, K, 2)
    degrees, descriptor distances and indices (Q, K)) → (Q, S) nats/sr, float64, in tiles."""
    mu, d, valid = _tensors(nb_latlon, distances, indices)
    if not bool(valid.any(dim=1).all()):
        raise GeopipeError("retrieval density: some queries have no neighbour (empty or fully excluded database)")
    th, stats = torch.tensor(fit.theta, dtype=torch.float64), (torch.tensor(fit.feature_mean), torch.tensor(fit.feature_std))
    rows = max(1, _ENTRIES // max(x.shape[1] * mu.shape[1], 1))
    out = torch.empty(x.shape[:2], dtype=torch.float64)
    for a in range(0, x.shape[0], rows):
        sl = slice(a, a + rows)
        cos = torch.einsum("qsc,qkc->qsk", x[sl], mu[sl]).clamp(-1.0, 1.0)
        out[sl] = _log_p(cos, _parts(d[sl], valid[sl], th, stats))
    return out


def _mixture(fit: CalibratedKernel, nb_latlon, distances, indices):
    """The density as a (Q, 4K + 1)-component vMF mixture (μ, κ, w), for sampling."""
    mu, d, valid = _tensors(nb_latlon, distances, indices)
    p = _parts(d, valid, torch.tensor(fit.theta, dtype=torch.float64), (torch.tensor(fit.feature_mean), torch.tensor(fit.feature_std)))
    q, k = d.shape
    pi, w, log_eq = torch.exp(p["log_pi"]), torch.exp(p["log_w"]), p["log_eq"]
    weights = torch.cat([pi[0][:, None] * w, pi[1][:, None] * w, pi[2][:, None] * w, pi[3][:, None] * torch.exp(log_eq), pi[4][:, None]], dim=1)
    kappa = torch.cat([*(torch.exp(lk)[:, None].expand(q, k) for lk in p["log_k"]), torch.exp(p["log_kb"]).expand(q, k),
                       torch.full((q, 1), _KAPPA_UNIFORM, dtype=torch.float64)], dim=1)
    pole = torch.zeros((q, 1, 3), dtype=torch.float64)
    pole[..., 2] = 1.0
    return torch.cat([mu, mu, mu, mu, pole], dim=1), kappa, weights


def _expected_geoscore(xs: torch.Tensor, mu: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(Q, K) Monte-Carlo E[5000·exp(−d(x, μ_k)/1492.7 km)] over samples xs (Q, S, 3); −inf for missing neighbours."""
    cos = torch.einsum("qsc,qkc->qsk", xs, mu).clamp(-1.0, 1.0)
    score = torch.exp(-torch.arccos(cos) * (EARTH_RADIUS_KM / GEOSCORE_SCALE_KM)).mean(dim=1) * 5000.0
    return score.masked_fill(~valid, -math.inf)


def calibrated_columns(fit: CalibratedKernel, nb_latlon: np.ndarray, distances: np.ndarray, indices: np.ndarray,
                       true_latlon: np.ndarray | None, n_samples: int = 256, seed: int = 0, first: int = 0,
                       group: int = 512) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Point predictions (Q, 2) degrees and the columns neg_entropy_nats, entropy_bits,
    effective_area_km2 (Monte-Carlo, ``n_samples``) and, with true positions (Q, 2) degrees,
    log_likelihood (nats/sr) and hdr_rank. The point is the neighbour position with the highest
    expected GeoScore under the density (over the same samples): the Bayes choice for GeoScore,
    a regional vote that still lands on a neighbour. Queries are sampled in groups of
    ``group``; the one at position g (``first`` + offset) is seeded ``seed + g``."""
    if first % group:
        raise ValueError(f"calibrated_columns: first={first} is not a multiple of the sampling group {group}")
    nb, dist, idx = np.asarray(nb_latlon, dtype=np.float64), np.asarray(distances), np.asarray(indices)
    mu, _, valid = _tensors(nb, dist, idx)
    m_mu, m_kappa, m_w = _mixture(fit, nb, dist, idx)
    logps, best = [], []
    for a in range(0, mu.shape[0], group):
        sl = slice(a, a + group)
        xs = sample_vmf_mixture(m_mu[sl], m_kappa[sl], m_w[sl], n_samples, generator=torch.Generator().manual_seed(seed + first + a))
        logps.append(calibrated_log_density(fit, xs, nb[sl], dist[sl], idx[sl]))
        best.append(_expected_geoscore(xs, mu[sl], valid[sl]).argmax(dim=1))
    logp = torch.cat(logps) if logps else torch.zeros((0, n_samples), dtype=torch.float64)
    pick = torch.cat(best) if best else torch.zeros(0, dtype=torch.int64)
    pred = xyz_to_latlon(mu[torch.arange(mu.shape[0]), pick]).numpy()
    out = {name: v.numpy() for name, v in localizability_from_logp(logp).items()}
    if true_latlon is not None:
        xt = latlon_to_xyz(torch.from_numpy(np.asarray(true_latlon, dtype=np.float64)))
        lt = calibrated_log_density(fit, xt[:, None], nb, dist, idx)[:, 0]
        out["log_likelihood"] = lt.numpy()
        out["hdr_rank"] = (logp > lt[:, None]).double().mean(dim=1).numpy()
    return pred, out

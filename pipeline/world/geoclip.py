"""The geoclip world's recipe: realistic, offline embeddings at real photo locations (docs/geoclip_world.md).

Records sit at points of a GPS gallery (GeoCLIP's 100K MP-16 locations). Each record i gets

* a **localizability radius** σᵢ ~ LogUniform(σ_min, σ_max) km (default 1 … 2,500 km);
* a **displaced centre** cᵢ: the truth xᵢ moved by a 2-D Gaussian step of per-axis std σᵢ (random
  bearing, Rayleigh distance), so the truth is itself a draw from the kernel around cᵢ;
* ``samples`` points drawn from the same kernel around cᵢ, each **snapped to its nearest gallery
  location** (photos exist where people take them), and the clean embedding
  ``ēᵢ = normalise(mean_j u(g_ij))`` of the unit location-encoder outputs u: fine detail averages
  out for broad kernels, so the embedding carries how localizable the record is;
* with probability ``mixed_fraction`` a **second place** Bᵢ ≥ ``mix_min_km`` away (its own radius
  and kernel): eᵢ = normalise(α ē_A + (1 − α) ē_B), α ~ U(0.3, 0.7), the truth staying at A;
* **noise shaped like location signal**: ν · Xᵀn / √(K·tr Σ) with X (K, D) centred clean
  embeddings of K random records and n ~ N(0, I_K) (covariance Σ of the clean embeddings,
  expected norm ν), then normalised.

Splits are spatial: gallery points within ``dup_km`` of each other are chained into one place
(connected components), and each place goes whole to train, val or test (seeded, in proportion
to the requested counts), so near-duplicate locations never straddle splits. Gallery points in
``heldout_box`` form the held-out region: only its own split has them, and no other record's
kernel snaps to them. Everything is a function of ``seed`` (numpy only; scipy's KD-tree).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from geopipe.pipeline.core.errors import ConfigError, check_int
from geopipe.pipeline.sphere.places import place_ids

__all__ = ["SPLITS", "GeoclipWorldConfig", "WorldPlan", "plan_world", "embed_world", "world_label", "config_dict", "to_xyz", "to_latlon"]

SPLITS = ("train", "val", "test", "heldout")
_R_KM = 6371.0088
_MIX_ALPHA = (0.3, 0.7)
_NOISE_BASIS = 2048  # K records whose centred clean embeddings span the noise


@dataclass(frozen=True)
class GeoclipWorldConfig:
    """Sizes, seed and recipe parameters (units: km; fractions in [0, 1)). heldout_box:
    (lat_min, lat_max, lon_min, lon_max) degrees of the held-out region (default New Zealand)."""

    n_train: int = 20000
    n_val: int = 2000
    n_test: int = 2000
    n_heldout: int = 500
    seed: int = 0
    radius_min_km: float = 1.0
    radius_max_km: float = 2500.0
    samples: int = 32
    mixed_fraction: float = 0.1
    mix_min_km: float = 3000.0
    noise: float = 0.5
    dup_km: float = 0.1
    heldout_box: tuple[float, float, float, float] = (-48.0, -34.0, 165.0, 179.9)
    heldout_name: str = "new_zealand"

    def __post_init__(self) -> None:
        for name, low in (("n_train", 1), ("n_val", 0), ("n_test", 0), ("n_heldout", 0), ("seed", 0), ("samples", 1)):
            check_int(getattr(self, name), name, low, where="geoclip world")
        if not 0 < self.radius_min_km <= self.radius_max_km <= 20000:
            raise ConfigError(f"geoclip world: need 0 < radius_min_km <= radius_max_km <= 20000 km, got "
                              f"{self.radius_min_km!r}, {self.radius_max_km!r}")
        for name in ("mixed_fraction",):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"geoclip world: {name} must lie in [0, 1), got {getattr(self, name)!r}")
        for name in ("noise", "dup_km", "mix_min_km"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"geoclip world: {name} must be a finite number >= 0, got {getattr(self, name)!r}")
        object.__setattr__(self, "heldout_box", tuple(float(v) for v in self.heldout_box))


@dataclass(frozen=True)
class WorldPlan:
    """Everything but the encoder outputs, per record in split order (``split``: (n,) index into
    :data:`SPLITS`): gallery index of the truth, component (place) id, radius σ km, centre (lat,
    lon) degrees, (n, samples) snapped gallery indices, and for mixed records (mixed (n,) bool) the
    partner's gallery index, snapped samples and weight α (−1 / NaN elsewhere)."""

    split: np.ndarray
    gallery_index: np.ndarray
    place_id: np.ndarray
    radius_km: np.ndarray
    centre: np.ndarray
    sample_index: np.ndarray
    mixed: np.ndarray
    partner_index: np.ndarray
    partner_samples: np.ndarray
    alpha: np.ndarray

    def needed(self) -> np.ndarray:
        """Sorted unique gallery indices whose encoder outputs the embeddings use."""
        return np.unique(np.concatenate([self.sample_index.ravel(), self.partner_samples.ravel()]))


def world_label(cfg: GeoclipWorldConfig, encoder_name: str) -> str:
    """The stores' backbone name: recipe version, encoder and every parameter that shapes an embedding."""
    return (f"geoclip-world/v1[{encoder_name}; radius {cfg.radius_min_km:g}-{cfg.radius_max_km:g} km log-uniform; "
            f"{cfg.samples} samples; mixed {cfg.mixed_fraction:g} >= {cfg.mix_min_km:g} km; noise {cfg.noise:g}; seed {cfg.seed}]")


def to_xyz(latlon: np.ndarray) -> np.ndarray:
    """(..., 2) degrees → (..., 3) float64 unit vectors."""
    la, lo = np.deg2rad(latlon[..., 0]), np.deg2rad(latlon[..., 1])
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def to_latlon(xyz: np.ndarray) -> np.ndarray:
    """(..., 3) vectors → (..., 2) degrees (lat, lon ∈ [−180, 180))."""
    x = xyz / np.linalg.norm(xyz, axis=-1, keepdims=True)
    lat = np.rad2deg(np.arcsin(np.clip(x[..., 2], -1, 1)))
    lon = (np.rad2deg(np.arctan2(x[..., 1], x[..., 0])) + 180.0) % 360.0 - 180.0
    return np.stack([lat, lon], axis=-1)


def _step(x: np.ndarray, sigma_km: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move unit vectors x (n, 3) by a tangent-plane Gaussian step of per-axis std σ km (≤ half the globe)."""
    z = rng.standard_normal(x.shape)
    t = z - np.sum(z * x, axis=-1, keepdims=True) * x
    t /= np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
    theta = np.minimum(sigma_km * np.sqrt(-2.0 * np.log1p(-rng.random(x.shape[:-1]))) / _R_KM, math.pi)[..., None]
    return np.cos(theta) * x + np.sin(theta) * t


def _components(xyz: np.ndarray, dup_km: float) -> np.ndarray:
    """(G,) int64 ids of the places: points chained by links shorter than ``dup_km``."""
    return place_ids(xyz, dup_km)


def _splits(comp: np.ndarray, held: np.ndarray, cfg: GeoclipWorldConfig, rng: np.random.Generator) -> list[np.ndarray]:
    """Gallery indices of train, val, test, heldout (sorted): whole places per split, exact counts."""
    total = cfg.n_train + cfg.n_val + cfg.n_test
    u = rng.random(int(comp.max()) + 1)[comp]
    side = np.where(u < cfg.n_val / total, 1, np.where(u < (cfg.n_val + cfg.n_test) / total, 2, 0))
    out = []
    for s, n in enumerate((cfg.n_train, cfg.n_val, cfg.n_test, cfg.n_heldout)):
        pool = np.flatnonzero(held) if s == 3 else np.flatnonzero(~held & (side == s))
        if s < 3 and pool.size < n:
            raise ConfigError(f"geoclip world: the gallery's {SPLITS[s]} places hold {pool.size} points, fewer than "
                              f"n_{SPLITS[s]}={n}; ask for fewer records")
        out.append(np.sort(rng.choice(pool, size=min(n, pool.size), replace=False)))
    return out


def _kernel_samples(x: np.ndarray, sigma: np.ndarray, m: int, trees: list, which: np.ndarray, rng):
    """Centres (n, 3) and (n, m) snapped gallery indices of kernels of std σ (n,) km around x (n, 3)."""
    centre = _step(x, sigma, rng)
    pts = _step(np.repeat(centre[:, None, :], m, axis=1), sigma[:, None], rng)
    idx = np.empty(pts.shape[:2], dtype=np.int64)
    for t, (tree, members) in enumerate(trees):
        sel = which == t
        if sel.any():
            idx[sel] = members[tree.query(pts[sel].reshape(-1, 3))[1]].reshape(-1, m)
    return centre, idx


def plan_world(gallery: np.ndarray, cfg: GeoclipWorldConfig) -> WorldPlan:
    """Draw the world (see the module docstring) from ``gallery`` (G, 2) degrees."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed))
    g = np.asarray(gallery, dtype=np.float64)
    xyz = to_xyz(g)
    la0, la1, lo0, lo1 = cfg.heldout_box
    held = (g[:, 0] >= la0) & (g[:, 0] <= la1) & (g[:, 1] >= lo0) & (g[:, 1] <= lo1)
    comp = _components(xyz, cfg.dup_km)
    parts = _splits(comp, held, cfg, rng)
    gi = np.concatenate(parts)
    split = np.concatenate([np.full(p.size, s, dtype=np.int8) for s, p in enumerate(parts)])
    n = gi.size
    lo, hi = math.log(cfg.radius_min_km), math.log(cfg.radius_max_km)
    sigma = np.exp(rng.uniform(lo, hi, n))
    outside = np.flatnonzero(~held)
    trees = [(cKDTree(xyz[outside]), outside), (cKDTree(xyz), np.arange(len(g)))]
    centre, samples = _kernel_samples(xyz[gi], sigma, cfg.samples, trees, (split == 3).astype(np.int64), rng)
    mixed = rng.random(n) < cfg.mixed_fraction
    partner = np.full(n, -1, dtype=np.int64)
    todo = np.flatnonzero(mixed)
    for _ in range(50):  # rejection sampling of far-apart partners outside the held-out region
        if todo.size == 0:
            break
        cand = rng.choice(outside, size=todo.size)
        ok = np.sum(xyz[cand] * xyz[gi[todo]], axis=1) <= math.cos(cfg.mix_min_km / _R_KM)
        partner[todo[ok]] = cand[ok]
        todo = todo[~ok]
    mixed &= partner >= 0
    psig = np.exp(rng.uniform(lo, hi, int(mixed.sum())))
    _, psamples = _kernel_samples(xyz[partner[mixed]], psig, cfg.samples, trees, np.zeros(int(mixed.sum()), np.int64), rng)
    alpha = np.full(n, np.nan)
    alpha[mixed] = rng.uniform(*_MIX_ALPHA, int(mixed.sum()))
    partner[~mixed] = -1
    return WorldPlan(split, gi, comp[gi], sigma, to_latlon(centre), samples, mixed, partner, psamples, alpha)


def embed_world(plan: WorldPlan, unit: np.ndarray, cfg: GeoclipWorldConfig, block: int = 1024) -> np.ndarray:
    """(n, D) float32 unit embeddings from ``unit`` (G, D) unit encoder outputs of the gallery
    (rows outside :meth:`WorldPlan.needed` are never read)."""
    def mean_of(idx: np.ndarray) -> np.ndarray:
        out = np.empty((idx.shape[0], unit.shape[1]), dtype=np.float32)
        for s in range(0, idx.shape[0], block):
            out[s:s + block] = unit[idx[s:s + block]].astype(np.float32).mean(axis=1)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    e = mean_of(plan.sample_index)
    if plan.mixed.any():
        a = plan.alpha[plan.mixed, None].astype(np.float32)
        e[plan.mixed] = a * e[plan.mixed] + (1 - a) * mean_of(plan.partner_samples)
        e /= np.linalg.norm(e, axis=1, keepdims=True)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    basis = e[np.sort(rng.choice(e.shape[0], size=min(_NOISE_BASIS, e.shape[0]), replace=False))]
    basis = basis - basis.mean(axis=0)
    scale = cfg.noise / math.sqrt(max(float(np.sum(basis * basis)), 1e-12))  # E‖Xᵀn‖² = Σ‖x_k‖² = K·tr Σ
    for s in range(0, e.shape[0], block):
        n = rng.standard_normal((min(block, e.shape[0] - s), basis.shape[0])).astype(np.float32)
        e[s:s + block] += scale * (n @ basis)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def config_dict(cfg: GeoclipWorldConfig) -> dict:
    """The config as plain JSON values (the heldout box as a list)."""
    d = asdict(cfg)
    d["heldout_box"] = list(cfg.heldout_box)
    return d

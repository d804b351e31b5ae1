"""Loading a trained model from its checkpoint and scoring batches of embeddings.

``predict_batch`` is the library core of ``geopipe predict``: point predictions (guided
sample, or best-of-N ensemble), extra samples, exact log-likelihood of the truth,
localizability and the truth's HDR rank, all as numpy columns matching
:mod:`geopipe.schemas.predictions`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from geopipe.pipeline.artifacts.predictions import predictions_table
from geopipe.pipeline.core.errors import ConfigError, GeopipeError
from geopipe.pipeline.core.limits import MAX_STEPS
from geopipe.pipeline.infer.localizability import hdr_rank, localize
from geopipe.pipeline.infer.model_source import open_model_source
from geopipe.pipeline.infer.regions import REGION_DENSITIES, check_mass, hdr_regions
from geopipe.pipeline.methods.registry import method_from_dict
from geopipe.pipeline.model.conditioning import CondStats
from geopipe.pipeline.model.likelihood import ADAPTIVE_SOLVERS
from geopipe.pipeline.model.network import NetworkConfig
from geopipe.pipeline.sphere.geometry import haversine_km, latlon_to_xyz, xyz_to_latlon
from geopipe.pipeline.store.format import nonfinite_records
from geopipe.pipeline.store.space import check_same_space
from geopipe.schemas.checkpoint import GENERATIVE, checkpoint_kind

__all__ = ["Predictor", "PredictOptions", "load_predictor", "cached_predictor", "record_generator", "predict_batch", "predict_rows", "region_density"]


@dataclass(frozen=True)
class PredictOptions:
    """Sampling options (defaults: 16 steps, guidance 2; docs/methods.md#samplers). The exact likelihoods
    (``nll``, ``localizability``, ``ensemble``, exact regions) solve their ODE with ``solver`` at
    ``rtol``/``atol``: bosh3 at rtol 1e-5, atol 1e-4 needs 0.58× the evaluations of dopri5
    at 1e-5 and is closer to the exact value on a trained model (README, "Likelihood cost")."""

    steps: int = 16
    guidance: float = 2.0
    sampler: str | None = None
    samples: int = 0  # extra unguided samples per record, stored as lists
    ensemble: int = 0  # >0: best-likelihood of N unguided samples replaces the guided point
    nll: bool = False
    localizability: int = 0  # Monte-Carlo samples for −H (0 = off)
    rtol: float = 1e-5
    atol: float = 1e-4
    likelihood_every: int = 1  # NLL / localizability only for store rows r with r % likelihood_every == 0
    region: float | None = None  # mass q of each record's highest-density region polygon (pipeline/infer/regions.py; every row)
    region_density: str = "auto"  # exact | kde | auto (exact for closed-form densities, kde of the draws for flows)
    solver: str = "bosh3"  # adaptive ODE solver of the likelihoods (geopipe.pipeline.model.likelihood.ADAPTIVE_SOLVERS)

    def __post_init__(self) -> None:
        if self.region is not None:
            check_mass(self.region)  # one-line ConfigError unless 0 < q < 1
        if self.region_density not in ("auto", *REGION_DENSITIES):
            raise ConfigError(f"--region-density must be one of {['auto', *REGION_DENSITIES]}, got {self.region_density!r}")
        for name, least in (("steps", 1), ("samples", 0), ("ensemble", 0), ("localizability", 0), ("likelihood_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least or (name == "steps" and v > MAX_STEPS):
                raise ConfigError(f"--{name} must be a whole number >= {least}{f' and <= {MAX_STEPS:,}' if name == 'steps' else ''}, "
                                  f"got {v!r}")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance):
            raise ConfigError(f"--guidance must be a finite number, got {self.guidance!r}")
        if self.solver not in ADAPTIVE_SOLVERS:
            raise ConfigError(f"--solver must be one of {list(ADAPTIVE_SOLVERS)}, got {self.solver!r}")
        for name in ("rtol", "atol"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v < 1:
                raise ConfigError(f"--{name} must lie in (0, 1), got {v!r}")


@dataclass
class Predictor:
    """A loaded model: the method object, its network (eval mode, EMA weights) and its config."""

    method: object
    model: torch.nn.Module
    config: dict
    device: torch.device
    cond_stats: CondStats
    space: dict | None = None  # the embedding space it expects (geopipe.pipeline.store.space)

    def condition(self, embeddings) -> torch.Tensor:
        """(B, D) store embeddings → the network's conditioning input (standardised, float32; the
        hybrid method appends each record's neighbours in the model's gallery)."""
        raw = torch.as_tensor(embeddings, device=self.device)
        return self.method.condition(self.model, raw, self.cond_stats.apply(raw))


def load_predictor(source: str, device: torch.device, expect_space: dict | None = None, what: str = "the store") -> Predictor:
    """Load the model at ``source`` (checkpoint directory, PLONK directory or ``hf-hub:org/name``;
    safetensors + JSON, never unpickled) onto ``device``.

    expect_space: the embedding space of the data it will score (e.g. ``store_space(store)``);
    a model of another space is refused in one line naming both (``what`` names the data).
    """
    src = open_model_source(source)
    config = src.config
    if checkpoint_kind(config) != GENERATIVE:
        raise GeopipeError(f"checkpoint {source} holds {config['method']!r} uncertainty heads, not a generative model; "
                           "use it as --bayescap of predict or retrieve, and give --checkpoint a model of `geopipe train --method rfm` "
                           "(or flow, diffusion, ...)")
    if expect_space is not None:
        check_same_space(f"model {source}", src.space, what, expect_space,
                         hint=f"extract the images with the model's backbone (geopipe extract --backbone {src.space.get('name')}), "
                              "or use a model trained on this store")
    method = method_from_dict(config["method"])
    net_cfg = NetworkConfig.from_dict(config["network"])
    _check_weight_shapes(source, src.weight_shapes(), method, net_cfg)
    model = method.build_model(net_cfg)
    missing, unexpected = model.load_state_dict(src.weights(), strict=False)
    if missing or unexpected:
        raise GeopipeError(f"checkpoint {source} does not match its network config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    stats = CondStats.from_dict(config.get("condition"), int(config["embed_dim"]))
    return Predictor(method, model.to(device).eval(), config, device, stats, src.space)


def _check_weight_shapes(checkpoint: str, found: dict, method, net_cfg: NetworkConfig) -> None:
    """Compare the config's network (built on the meta device: no memory) with the weights'
    shapes read from the file header, before anything is allocated."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in method.build_model(net_cfg).state_dict().items()}
    bad = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
    if bad:
        k = bad[0]
        raise GeopipeError(f"checkpoint {checkpoint}: the weights do not match config.json's network ({len(bad)} tensor(s) differ, "
                           f"e.g. {k}: weights {found.get(k, 'missing')}, config {expected.get(k, 'missing')}); "
                           f"restore the matching config.json or retrain")


def _chunks(n: int, size: int):
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + size))


def _log_likelihood(p: Predictor, x: torch.Tensor, cond: torch.Tensor, opts: PredictOptions, chunk: int) -> torch.Tensor:
    out = [p.method.log_likelihood(p.model, x[s], cond[s], rtol=opts.rtol, atol=opts.atol, method=opts.solver) for s in _chunks(len(x), chunk)]
    return torch.cat(out)


def _samples_logp(p: Predictor, cond: torch.Tensor, n: int, opts: PredictOptions, g, chunk: int, keys=None):
    """(B, n, 3) unguided samples (unit vectors) and their (B, n) log densities there, in record
    chunks of ≈ ``chunk`` points: the candidates of ``--ensemble``, ranked as locations. ``keys``
    (one per record) name a record whose samples are non-finite."""
    xs, lps = [], []
    per = max(1, chunk // n)
    for s in _chunks(len(cond), per):
        y = p.method.sample(p.model, cond[s], n, steps=opts.steps, guidance=0.0, sampler=opts.sampler, generator=g,
                            keys=None if keys is None else keys[s])
        flat_c = cond[s].repeat_interleave(n, dim=0)
        lp = p.method.log_likelihood(p.model, y.reshape(-1, 3), flat_c, rtol=opts.rtol, atol=opts.atol, method=opts.solver)
        xs.append(y)
        lps.append(lp.reshape(-1, n))
    return torch.cat(xs), torch.cat(lps)


def region_density(method, opts: PredictOptions) -> str:
    """The density a region is drawn from: ``opts.region_density``, where "auto" = the model's
    own for closed-form densities (vMF family) and a KDE of its draws for flows (whose exact
    density costs an ODE solve per grid point)."""
    if opts.region_density != "auto":
        return opts.region_density
    return "exact" if getattr(method, "closed_form_density", False) else "kde"


@torch.no_grad()
def predict_batch(p: Predictor, cond, latlon_true, keys, opts: PredictOptions, generator: torch.Generator, chunk: int = 4096) -> dict:
    """Score one batch. ``cond`` (B, D) embeddings; ``latlon_true`` (B, 2) degrees or None.

    Returns a dict of numpy columns named as in :data:`geopipe.schemas.predictions.PREDICTIONS_SCHEMA`
    (optional columns absent when not requested). ``opts.region`` = q adds ``region`` (WKB polygon of
    the q-HDR), ``region_mass`` and ``region_area_km2`` (km²) per record: 1000 draws, their
    log-likelihoods and ≈ 2–4 × 96² grid log-likelihoods per record (:func:`hdr_regions`).
    """
    cond = p.condition(cond)
    truth = None  # (B,) rows whose true location is known (finite); a NaN truth blanks only its row
    if latlon_true is not None:
        latlon_true = np.asarray(latlon_true, dtype=np.float64)
        truth = np.isfinite(latlon_true).all(axis=1)
        truth = truth if truth.any() else None
    cols: dict = {}
    if opts.ensemble > 0:
        ys, lps = _samples_logp(p, cond, opts.ensemble, opts, generator, chunk, keys)
        point = ys[torch.arange(len(ys)), lps.argmax(dim=1)]
    else:
        point = p.method.predict_point(p.model, cond, steps=opts.steps, guidance=opts.guidance, sampler=opts.sampler, generator=generator,
                                       keys=keys)
    ll = xyz_to_latlon(point.double(), keys=keys).cpu().numpy()
    cols["lat"], cols["lon"] = ll[:, 0], ll[:, 1]
    if opts.samples > 0:
        ys = p.method.sample(p.model, cond, opts.samples, steps=opts.steps, guidance=0.0, sampler=opts.sampler, generator=generator,
                             keys=keys)
        sl = xyz_to_latlon(ys.double()).cpu().numpy()
        cols["sample_lat"], cols["sample_lon"] = list(sl[..., 0]), list(sl[..., 1])
    true_logp = None
    if truth is not None:
        known = np.flatnonzero(truth)
        true_ll = np.where(truth[:, None], latlon_true, np.nan)
        cols["true_lat"], cols["true_lon"] = true_ll[:, 0], true_ll[:, 1]
        dist = np.full(len(true_ll), np.nan)
        dist[known] = haversine_km(ll[known, 0], ll[known, 1], true_ll[known, 0], true_ll[known, 1])
        cols["distance_km"] = dist
        if opts.nll or opts.localizability > 0:
            x_true = latlon_to_xyz(torch.as_tensor(true_ll[known], dtype=torch.float64)).float().to(p.device)
            rows = torch.as_tensor(known, device=cond.device)
            lp = _log_likelihood(p, x_true, cond[rows] if len(known) < len(cond) else cond, opts, chunk)
            true_logp = torch.full((len(cond),), float("nan"), dtype=lp.dtype, device=lp.device)
            true_logp[rows] = lp
            cols["log_likelihood"] = true_logp.double().cpu().numpy()
    if opts.localizability > 0:
        loc = localize(p.method, p.model, cond, opts.localizability, steps=opts.steps, sampler=opts.sampler, batch_size=chunk,
                       rtol=opts.rtol, atol=opts.atol, generator=generator, keys=keys, solver=opts.solver)
        for name in ("neg_entropy_nats", "entropy_bits", "effective_area_km2"):
            cols[name] = getattr(loc, name).double().cpu().numpy()
        if true_logp is not None:
            rank = hdr_rank(true_logp.double(), loc.sample_logp.double()).double().cpu().numpy()
            cols["hdr_rank"] = np.where(truth, rank, np.nan)
    if opts.region is not None:  # last, so the columns above draw the same noise with or without it
        regions = hdr_regions(p.method, p.model, cond, opts.region, generator=generator, steps=opts.steps, sampler=opts.sampler,
                              rtol=opts.rtol, atol=opts.atol, chunk=chunk, keys=keys, solver=opts.solver, density=region_density(p.method, opts))
        cols["region"] = [None if r.geometry.is_empty else r.wkb for r in regions]  # WKB (Multi)Polygon, lon/lat degrees
        cols["region_mass"] = np.array([r.mass for r in regions])
        cols["region_area_km2"] = np.array([r.area_km2 for r in regions])
    return cols



_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2


def cached_predictor(source: str, device: torch.device, expect_space: dict | None = None, what: str = "the store") -> Predictor:
    """:func:`load_predictor`, reused while the model's content is unchanged (keyed by its
    identity, so a retrain into the same directory is picked up). A Dask worker process thus
    loads each model once, not once per partition. The space check runs on every call."""
    key = (str(source), open_model_source(source).identity, str(device))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        p = _CACHE[key]
        if expect_space is not None:
            check_same_space(f"model {source}", p.space, what, expect_space)
        return p
    p = load_predictor(source, device, expect_space=expect_space, what=what)
    _CACHE[key] = p
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return p


def record_generator(seed: int, row: int, device) -> torch.Generator:
    """The noise generator for the batch (or record) starting at store row ``row``: seeded from
    (seed, row) alone, so results do not depend on partitioning or worker count."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(row))


_LIKELIHOOD_COLUMNS = ("log_likelihood", "neg_entropy_nats", "entropy_bits", "effective_area_km2", "hdr_rank")


def _predict_batch_rows(p: Predictor, emb, latlon, keys, opts: PredictOptions, seed: int, b0: int) -> dict:
    """:func:`predict_batch` for store rows [b0, b0 + len(keys)), honouring ``likelihood_every``:
    the point predictions of every row come from the batch generator exactly as without the
    option; the likelihood columns are computed for the selected rows only (NaN elsewhere)."""
    gen = record_generator(seed, b0, p.device)
    k = opts.likelihood_every
    if k == 1 or not (opts.nll or opts.localizability):
        return predict_batch(p, emb, latlon, keys, opts, gen)
    cols = predict_batch(p, emb, latlon, keys, dataclasses.replace(opts, nll=False, localizability=0), gen)
    idx = np.flatnonzero((np.arange(b0, b0 + len(keys)) % k) == 0)
    if idx.size == 0:
        return cols
    sub = predict_batch(p, emb[idx], None if latlon is None else latlon[idx], [keys[i] for i in idx], dataclasses.replace(opts, region=None),
                        record_generator(seed, b0, p.device))
    for name in _LIKELIHOOD_COLUMNS:
        if name in sub:
            full = np.full(len(keys), np.nan)
            full[idx] = sub[name]
            cols[name] = full
    return cols


def predict_rows(p: Predictor, store, start: int, stop: int, opts: PredictOptions, *, seed: int, batch_size: int):
    """Score store rows [start, stop) in batches of ``batch_size`` → a predictions Arrow table."""
    import pyarrow as pa

    tables = []
    for b0 in range(start, stop, batch_size):
        b1 = min(stop, b0 + batch_size)
        keys = np.asarray(store.keys[b0:b1]).astype(str).tolist()
        emb = np.asarray(store.embeddings[b0:b1])
        bad = nonfinite_records(keys, emb)
        if bad:  # named here: the model would only return NaN for it
            raise GeopipeError(f"store {store.path}: {bad}; the store is damaged: run `geopipe store verify {store.path}`")
        cols = _predict_batch_rows(p, emb, np.asarray(store.latlon[b0:b1]), keys, opts, seed, b0)
        cols["key"] = keys
        tables.append(predictions_table(cols, b1 - b0))
    if not tables:
        return predictions_table({"key": [], "lat": [], "lon": []}, 0)
    return pa.concat_tables(tables)

"""Pretrained PLONK models (Hugging Face Hub, MIT) read as a geopipe checkpoint config + state dict.

A PLONK model directory (``huggingface_hub`` ``PyTorchModelHubMixin`` layout) holds ``config.json``
= {"input_dim", "dim", "depth", "expansion", "cond_dim"} and ``model.safetensors`` with PLONK's
GeoAdaLNMLP keys. The network is geopipe's GeoAdaLNMLP with other module names (docs/methods.md#network,
spec §4.2; same LayerNorm eps 1e-5 without affine, time features of 1000·γ with f_k = 10000^(−2k/C),
cosines first, unbiased-std standardisation, chunk orders scale/shift/gate and scale/shift):

    PLONK                                  geopipe
    initial_mapper                         in_proj
    time_embedder.map_time.{0,2}           time_mlp.{0,2}
    time_embedder.encode_time.freqs        — (buffer: checked equal to geopipe's frequencies, dropped)
    cond_mapper                            cond_proj
    blocks.<i>.ada_map.1                   trunk.blocks.<i>.ada
    blocks.<i>.mlp.{0,3}                   trunk.blocks.<i>.mlp.{0,2}   (PLONK's mlp.2 is a Dropout(0))
    final_adaln.1                          trunk.final_ada
    final_linear                           out_proj

PLONK's pipeline samples these models with the skewed sigmoid (start −7, end 3, τ 1), no guidance
(cfg 0) and raw, un-standardised embeddings: the config says method ``rfm`` (``flow`` / ``diffusion``
for the ``*_flow`` / ``*_diffusion`` repos) with that schedule, ``normalized`` False and
``condition`` None (identity conditioning). The backbone is known from the repo id
(:data:`PLONK_BACKBONES`); otherwise the caller names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from geopipe.pipeline.core.errors import GeopipeError
from geopipe.pipeline.vision.towers import TOWERS, hub_cache_dir, hub_offline, published_identity

__all__ = [
    "PLONK_BACKBONES",
    "PLONK_SCHEDULE",
    "PLONK_CONFIG_KEYS",
    "is_plonk_dir",
    "read_plonk",
    "resolve_model_source",
]

_HF = "hf-hub:"
_CONFIG, _WEIGHTS = "config.json", "model.safetensors"
#: Keys of a PLONK ``config.json`` (the GeoAdaLNMLP constructor's arguments = geopipe's NetworkConfig fields).
PLONK_CONFIG_KEYS = ("input_dim", "dim", "depth", "expansion", "cond_dim")
#: The published models' Hub ids → the backbone (registry name) they were trained on.
PLONK_BACKBONES = {
    f"nicolas-dufour/PLONK_{data}{variant}": ("streetclip" if data == "OSV_5M" else "dinov2-vitl14-reg")
    for data in ("YFCC", "iNaturalist", "OSV_5M") for variant in ("", "_flow", "_diffusion")
}
#: PLONK's training and sampling schedule (schedule_to_dict form).
PLONK_SCHEDULE = {"name": "sigmoid", "start": -7.0, "end": 3.0, "tau": 1.0}
_METHODS = {"rfm": ("sphere", "riemann_euler"), "flow": ("r3", "euler"), "diffusion": ("r3", "ddim")}
_FREQS = "time_embedder.encode_time.freqs"
_RULES = [(re.compile(a), b) for a, b in (
    (r"initial_mapper\.(weight|bias)", r"in_proj.\1"),
    (r"time_embedder\.map_time\.([02])\.(weight|bias)", r"time_mlp.\1.\2"),
    (r"cond_mapper\.(weight|bias)", r"cond_proj.\1"),
    (r"blocks\.(\d+)\.ada_map\.1\.(weight|bias)", r"trunk.blocks.\1.ada.\2"),
    (r"blocks\.(\d+)\.mlp\.0\.(weight|bias)", r"trunk.blocks.\1.mlp.0.\2"),
    (r"blocks\.(\d+)\.mlp\.3\.(weight|bias)", r"trunk.blocks.\1.mlp.2.\2"),
    (r"final_adaln\.1\.(weight|bias)", r"trunk.final_ada.\1"),
    (r"final_linear\.(weight|bias)", r"out_proj.\1"),
)]


def _read_config(directory: Path) -> dict:
    path = directory / _CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GeopipeError(f"cannot read PLONK config {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(cfg, dict) or set(cfg) != set(PLONK_CONFIG_KEYS):
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        raise GeopipeError(f"{path} is not a PLONK config: keys {got}, expected exactly {list(PLONK_CONFIG_KEYS)}")
    for k in PLONK_CONFIG_KEYS:
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int) or cfg[k] < 1:
            raise GeopipeError(f"{path}: {k} must be a positive integer, got {cfg[k]!r}")
    if cfg["input_dim"] != 3 or cfg["dim"] % 8:
        raise GeopipeError(f"{path}: geopipe reads PLONK models on S² / R³ (input_dim 3, dim a multiple of 8), "
                           f"got input_dim {cfg['input_dim']}, dim {cfg['dim']}")
    return cfg


def is_plonk_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a PLONK ``config.json`` (exactly :data:`PLONK_CONFIG_KEYS`) and
    ``model.safetensors`` — and so not a geopipe checkpoint. Never raises."""
    p = Path(path)
    try:
        if not (p.is_dir() and (p / _WEIGHTS).is_file()):
            return False
        cfg = json.loads((p / _CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and set(cfg) == set(PLONK_CONFIG_KEYS)


def _expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """PLONK GeoAdaLNMLP parameter shapes (its own key names) for ``cfg``."""
    d, x, h, c, t = cfg["dim"], cfg["input_dim"], cfg["expansion"] * cfg["dim"], cfg["cond_dim"], cfg["dim"] // 4
    linears = {"initial_mapper": (d, x), "time_embedder.map_time.0": (d, t), "time_embedder.map_time.2": (d, d),
               "cond_mapper": (d, c), "final_adaln.1": (2 * d, d), "final_linear": (x, d)}
    for i in range(cfg["depth"]):
        linears.update({f"blocks.{i}.ada_map.1": (3 * d, d), f"blocks.{i}.mlp.0": (h, d), f"blocks.{i}.mlp.3": (d, h)})
    shapes = {}
    for name, (out, inp) in linears.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)
    return shapes


def _geopipe_key(key: str) -> str:
    for pattern, repl in _RULES:
        if pattern.fullmatch(key):
            return pattern.sub(repl, key)
    raise AssertionError(key)  # unreachable: keys are checked against _expected_shapes first


def _check_freqs(freqs: Tensor, cfg: dict, path: Path) -> None:
    """PLONK stores its time frequencies as a buffer; geopipe recomputes them, so they must agree."""
    half = cfg["dim"] // 8
    want = (1.0 / 10000.0) ** (torch.arange(half, dtype=torch.float32) / half)
    if tuple(freqs.shape) != (half,) or not torch.allclose(freqs.float(), want, rtol=1e-6, atol=0.0):
        raise GeopipeError(f"{path}: {_FREQS} differs from the time frequencies 10000^(-2k/C) geopipe computes; "
                           f"this is not a PLONK GeoAdaLNMLP geopipe can reproduce")


def _remap(state: dict[str, Tensor], cfg: dict, path: Path) -> dict[str, Tensor]:
    expected = _expected_shapes(cfg)
    if _FREQS in state:
        _check_freqs(state[_FREQS], cfg, path)
    unmapped = sorted(set(state) - set(expected) - {_FREQS})
    if unmapped:
        raise GeopipeError(f"{path}: unmapped PLONK weight(s) {unmapped[:3]} ({len(unmapped)} in all) for depth "
                           f"{cfg['depth']}; not a PLONK GeoAdaLNMLP of config.json's shape")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GeopipeError(f"{path}: missing PLONK weight(s) {missing[:3]} ({len(missing)} in all); the file is incomplete")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape or not state[k].is_floating_point():
            raise GeopipeError(f"{path}: {k} has shape {tuple(state[k].shape)} ({state[k].dtype}), config.json implies "
                               f"{shape} (floating point)")
    return {_geopipe_key(k): state[k] for k in expected}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _repo_of(directory: Path) -> tuple[str | None, str | None]:
    """(repo id, revision) of a Hugging Face cache snapshot ``…/models--org--name/snapshots/<rev>``, else (None, None)."""
    parts = directory.resolve().parts if directory.exists() else directory.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        org_name = parts[-3][len("models--"):]
        if "--" in org_name:
            return org_name.replace("--", "/", 1), parts[-1]
    return None, None


def _backbone(backbone: str | dict | None, repo: str | None, directory: Path) -> dict:
    if isinstance(backbone, dict):
        return dict(backbone)
    name = backbone if backbone is not None else PLONK_BACKBONES.get(repo or "")
    if name is None:
        raise GeopipeError(f"cannot tell which backbone the PLONK model in {directory} was trained on (repo {repo or 'unknown'}); "
                           f"pass backbone='dinov2-vitl14-reg' (YFCC, iNaturalist) or 'streetclip' (OSV-5M)")
    if name not in TOWERS:
        raise GeopipeError(f"unknown PLONK backbone {name!r}; choose one of {sorted(TOWERS)} or pass a backbone identity dict")
    return published_identity(name)


def _method(method: str | None, repo: str | None) -> dict:
    name = method or ("flow" if (repo or "").endswith("_flow") else "diffusion" if (repo or "").endswith("_diffusion") else "rfm")
    if name not in _METHODS:
        raise GeopipeError(f"unknown PLONK method {name!r}; choose one of {sorted(_METHODS)}")
    space, sampler = _METHODS[name]
    # cond_drop 0.1 is PLONK's training-time CFG dropout (recorded for completeness; sampling ignores it)
    return {"name": name, "space": space, "schedule": dict(PLONK_SCHEDULE), "cond_drop": 0.1, "sampler": sampler}


def read_plonk(path: str | os.PathLike, *, repo: str | None = None, backbone: str | dict | None = None,
               method: str | None = None) -> tuple[dict, dict[str, Tensor]]:
    """Read a PLONK model directory → (geopipe checkpoint config dict, state dict in geopipe's key names).

    repo: Hub id (default: inferred from a Hugging Face cache path); it picks the backbone
    (:data:`PLONK_BACKBONES`) and the method (``*_flow`` → flow, ``*_diffusion`` → diffusion, else rfm).
    backbone: a tower name (``"dinov2-vitl14-reg"``, ``"streetclip"``) or a backbone identity dict,
    overriding the repo's. Any unmapped, missing or mis-shaped weight is a one-line GeopipeError.
    The safetensors file is read as tensors only (never unpickled).
    """
    from safetensors.torch import load_file

    directory = Path(path)
    cfg = _read_config(directory)
    weights = directory / _WEIGHTS
    try:
        raw = load_file(str(weights))
    except Exception as exc:  # missing file, corrupt header
        raise GeopipeError(f"cannot read PLONK weights {weights}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    state = _remap(raw, cfg, weights)
    cache_repo, revision = _repo_of(directory)
    repo = repo or cache_repo
    ident = _backbone(backbone, repo, directory)
    if int(ident.get("embed_dim", cfg["cond_dim"])) != cfg["cond_dim"]:
        raise GeopipeError(f"PLONK model {directory} takes {cfg['cond_dim']}-d embeddings but backbone "
                           f"{ident.get('name')!r} gives {ident['embed_dim']}-d ones; pass the backbone it was trained on")
    config = {
        "method": _method(method, repo),
        "network": {k: cfg[k] for k in PLONK_CONFIG_KEYS},
        "embed_dim": cfg["cond_dim"],
        "backbone": ident,
        "normalized": False,
        "condition": None,
        "step": 0,
        "source": {"format": "plonk", "repo": repo, "revision": revision, "sha256": _sha256(weights)},
    }
    return config, state


def resolve_model_source(source: str) -> str:
    """``"hf-hub:org/name"`` → the local snapshot directory (config.json + model.safetensors, downloaded or
    from the HF cache; HF_HUB_OFFLINE / HF_HUB_CACHE / HF_HOME are read now); a local directory → itself.
    Anything else, or a model neither cached nor downloadable, is a one-line GeopipeError saying what to do."""
    if not isinstance(source, str) or not source.strip():
        raise GeopipeError(f"model source must be a directory or 'hf-hub:org/name', got {source!r}")
    if not source.startswith(_HF):
        if os.path.isdir(source):
            return source
        raise GeopipeError(f"model source {source!r} is neither a local directory nor 'hf-hub:org/name' "
                           f"(e.g. hf-hub:nicolas-dufour/PLONK_YFCC)")
    repo = source[len(_HF):].strip().strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise GeopipeError(f"model source {source!r}: expected 'hf-hub:org/name'")
    return _snapshot(repo)


def _snapshot(repo: str) -> str:
    from huggingface_hub import snapshot_download

    cache, offline = hub_cache_dir(), hub_offline()
    todo = f"`hf download {repo} {_CONFIG} {_WEIGHTS}` once online (same HF_HOME / HF_HUB_CACHE)"
    try:
        folder = snapshot_download(repo, allow_patterns=[_CONFIG, _WEIGHTS, "model-*.safetensors"],  # + a geopipe checkpoint's versioned weights
                                   cache_dir=cache, local_files_only=offline)
    except Exception as exc:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors
        if offline:
            raise GeopipeError(f"model {repo!r} is not in the Hugging Face cache {cache} and downloads are off (HF_HUB_OFFLINE): "
                               f"run {todo}, or pass a local directory holding {_CONFIG} and {_WEIGHTS}") from None
        raise GeopipeError(f"could not fetch model {repo!r} from the Hugging Face Hub ({type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:160]}); check the id and the connection, or run {todo}") from None
    lacking = [f for f in (_CONFIG, _WEIGHTS) if not os.path.isfile(os.path.join(folder, f))]
    if lacking:
        raise GeopipeError(f"the cached snapshot {folder} of {repo!r} lacks {lacking}; run {todo}")
    return folder

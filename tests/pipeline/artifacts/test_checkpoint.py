"""Checkpoint directories: safetensors + JSON round trips, bit-identical resume, clear errors."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from geopipe.pipeline.artifacts.checkpoint import (
    CheckpointError,
    checkpoint_files,
    load_checkpoint_config,
    load_model_weights,
    load_train_state,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    pack_train_state,
    restore_train_state,
    save_checkpoint,
)
from geopipe.pipeline.core.provenance import provenance
from geopipe.pipeline.model.network import GeoAdaLNMLP, NetworkConfig
from geopipe.pipeline.train.optim import EMA, lr_at, make_optimizer, set_lr
from geopipe.schemas.checkpoint import CHECKPOINT_SCHEMA, CONFIG_FILE, MODEL_FILE, REQUIRED_CONFIG_KEYS

NET = NetworkConfig(input_dim=3, dim=16, depth=2, expansion=2, cond_dim=8)


def _config(step: int) -> dict:
    return {"kind": "generative", "method": {"name": "rfm", "space": "sphere"}, "network": NET.to_dict(), "embed_dim": 8, "backbone": {"name": "tiny"}, "step": step}


def _fresh(name: str, seed: int):
    torch.manual_seed(seed)
    model = GeoAdaLNMLP(NET)
    return model, make_optimizer(name, model.parameters(), lr=0.0, weight_decay=0.05), EMA(model, decay=0.9)


def _train(model, opt, ema, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)  # the batch depends only on the step: resumable
        y, cond, target = torch.randn(4, 3, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, 3, generator=g)
        gamma = torch.rand(4, generator=g)
        set_lr(opt, lr_at(step, lr0=1e-2, warmup=2, total=10))
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(y, gamma, cond), target).backward()
        opt.step()
        ema.update(model)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_resume_is_bit_identical(tmp_path, name):
    model, opt, ema = _fresh(name, seed=0)
    _train(model, opt, ema, range(5))

    model2, opt2, ema2 = _fresh(name, seed=0)
    _train(model2, opt2, ema2, range(3))
    state, meta = pack_train_state(model2, opt2, rng_seed=3407)
    save_checkpoint(tmp_path, model_state=ema2.state_dict(), config=_config(3), train_state=state, train_meta=meta)

    model3, opt3, ema3 = _fresh(name, seed=123)  # different init: everything must come from disk
    tensors, meta3 = load_train_state(tmp_path)
    assert meta3["step"] == 3 and meta3["rng_seed"] == 3407
    restore_train_state(model3, opt3, tensors, meta3)
    ema3.load_state_dict(load_model_weights(tmp_path))
    _train(model3, opt3, ema3, range(3, 5))

    _assert_same(model.state_dict(), model3.state_dict())
    _assert_same(ema.state_dict(), ema3.state_dict())
    t_ref, m_ref = optimizer_state_to_tensors(opt)
    t_new, m_new = optimizer_state_to_tensors(opt3)
    _assert_same(t_ref, t_new)
    assert m_ref == m_new
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_config_round_trip_and_provenance(tmp_path):
    model, _, ema = _fresh("adamw", seed=0)
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(7))
    cfg = load_checkpoint_config(tmp_path)
    assert {k: v for k, v in cfg.items() if k != "files"} == {**_config(7), "schema": CHECKPOINT_SCHEMA, **provenance()}
    assert NetworkConfig.from_dict(cfg["network"]) == NET
    assert load_train_state(tmp_path) is None
    _assert_same(load_model_weights(tmp_path), model.state_dict())


def test_kind_of_a_checkpoint_without_one_and_a_wrong_one(tmp_path):
    """Checkpoints written before ``kind`` existed read by the old rule; a kind that disagrees with the method is refused."""
    model, _, ema = _fresh("adamw", seed=0)
    old = {k: v for k, v in _config(1).items() if k != "kind"}
    save_checkpoint(tmp_path / "g", model_state=ema.state_dict(), config=old)
    save_checkpoint(tmp_path / "u", model_state=ema.state_dict(), config={**old, "method": "bayescap"})
    assert load_checkpoint_config(tmp_path / "g")["kind"] == "generative"
    assert load_checkpoint_config(tmp_path / "u")["kind"] == "uncertainty"
    for bad in ({**old, "kind": "uncertainty"}, {**old, "kind": "other"}):
        save_checkpoint(tmp_path / "b", model_state=ema.state_dict(), config=bad)
        with pytest.raises(CheckpointError, match="kind"):
            load_checkpoint_config(tmp_path / "b")


def test_save_without_train_state_removes_a_stale_one(tmp_path):
    model, opt, ema = _fresh("lamb", seed=0)
    _train(model, opt, ema, range(1))
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(1), train_state=pack_train_state(model, opt)[0], train_meta={"optimizer": optimizer_state_to_tensors(opt)[1]})
    assert load_train_state(tmp_path) is not None
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(2))
    assert load_train_state(tmp_path) is None


def test_not_a_safetensors_file_is_a_clear_error_and_never_unpickled(tmp_path):
    model, _, ema = _fresh("adamw", seed=0)
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(0))
    marker = tmp_path / "unpickled"

    class _Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    model_file = checkpoint_files(tmp_path)["model"]
    model_file.write_bytes(pickle.dumps({"w": _Payload()}))
    with pytest.raises(CheckpointError, match=r"model-00000000-[0-9a-f]{8}\.safetensors is not a readable safetensors file"):
        load_model_weights(tmp_path)
    assert not marker.exists()
    model_file.write_bytes(b"definitely not a tensor file")
    with pytest.raises(CheckpointError, match=model_file.name):
        load_model_weights(tmp_path)


def test_missing_or_bad_config_is_a_clear_error(tmp_path):
    model, _, ema = _fresh("adamw", seed=0)
    with pytest.raises(CheckpointError, match="lacks required key"):
        save_checkpoint(tmp_path, model_state=ema.state_dict(), config={k: v for k, v in _config(0).items() if k != "backbone"})
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(0))
    path = tmp_path / CONFIG_FILE
    for key in REQUIRED_CONFIG_KEYS:
        cfg = json.loads(path.read_text())
        del cfg[key]
        path.write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=rf"config\.json: (missing required key\(s\) \['{key}'\]|unsupported schema)"):
            load_checkpoint_config(tmp_path)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_checkpoint_config(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_config(tmp_path / "nope")


def test_interrupted_save_is_detected(tmp_path):
    model, _, ema = _fresh("adamw", seed=0)
    save_checkpoint(tmp_path / "a", model_state=ema.state_dict(), config=_config(3))
    save_checkpoint(tmp_path / "b", model_state=ema.state_dict(), config=_config(5))
    shutil.copy(checkpoint_files(tmp_path / "b")["model"], checkpoint_files(tmp_path / "a")["model"])  # new weights, old config
    with pytest.raises(CheckpointError, match="holds step 5 but config.json says step 3"):
        load_model_weights(tmp_path / "a")


def test_optimizer_mismatch_is_a_clear_error():
    model, lamb, _ = _fresh("lamb", seed=0)
    _, adamw, _ = _fresh("adamw", seed=0)
    tensors, meta = optimizer_state_to_tensors(lamb)
    with pytest.raises(CheckpointError, match="saved optimizer is 'Lamb' but training uses 'AdamW'"):
        optimizer_state_from_tensors(adamw, tensors, meta)


def test_each_save_is_versioned_and_committed_by_config_json(tmp_path):
    """Every save writes new files; config.json names them; files of earlier saves are gone."""
    model, opt, ema = _fresh("adamw", seed=0)
    for step in (1, 2, 2):
        state, meta = pack_train_state(model, opt)
        save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(step), train_state=state, train_meta=meta)
    files = checkpoint_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, *(p.name for p in files.values())])
    assert files["model"].name.startswith("model-00000002-") and load_train_state(tmp_path)[1]["step"] == 2


def test_interrupted_save_keeps_the_previous_one(tmp_path):
    """A save killed before its config.json rename (here: files of a save that never committed,
    plus a half-written temporary) leaves the last complete save loadable."""
    model, opt, ema = _fresh("adamw", seed=0)
    state, meta = pack_train_state(model, opt)
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(4), train_state=state, train_meta=meta)
    good = {k: v.clone() for k, v in load_model_weights(tmp_path).items()}
    (tmp_path / "model-00000008-0123abcd.safetensors").write_bytes(b"half")
    (tmp_path / ".model-00000008-0123abcd.safetensors.0123456789ab.tmp").write_bytes(b"half")
    assert load_checkpoint_config(tmp_path)["step"] == 4 and load_train_state(tmp_path)[1]["step"] == 4
    assert all(torch.equal(good[k], v) for k, v in load_model_weights(tmp_path).items())
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(8), train_state=state, train_meta=meta)
    assert not any("0123abcd" in p.name for p in tmp_path.iterdir())  # leftovers of the killed save are cleaned


def test_checkpoints_without_versioned_files_still_load(tmp_path):
    """Checkpoints written before versioned saves (fixed file names, no "files") read as before."""
    model, opt, ema = _fresh("adamw", seed=0)
    state, meta = pack_train_state(model, opt)
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(3), train_state=state, train_meta=meta)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    for role, path in checkpoint_files(tmp_path).items():
        path.rename(tmp_path / {"model": MODEL_FILE, "train_state": "train_state.safetensors", "train_state_json": "train_state.json"}[role])
    del cfg["files"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    assert set(load_model_weights(tmp_path)) == set(ema.state_dict()) and load_train_state(tmp_path)[1]["step"] == 3
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(4))  # upgraded: the fixed names go
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, checkpoint_files(tmp_path)["model"].name])


@pytest.mark.parametrize("key, value", [("depth", 10**9), ("depth", 1e9), ("dim", 0), ("expansion", 10**6), ("cond_dim", 9)])
def test_edited_network_config_is_refused_on_load(tmp_path, key, value):
    model, _, ema = _fresh("adamw", seed=0)
    save_checkpoint(tmp_path, model_state=ema.state_dict(), config=_config(0))
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    cfg["network"][key] = value
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config\.json: (network {key} = |embed_dim 8 must be)"):
        load_checkpoint_config(tmp_path)


def test_save_into_a_file_is_a_clear_error(tmp_path):
    model, _, ema = _fresh("adamw", seed=0)
    (tmp_path / "m").write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a directory"):
        save_checkpoint(tmp_path / "m", model_state=ema.state_dict(), config=_config(0))

"""A tiny embedding store and untrained checkpoints for stage tests (8-d embeddings, 16-wide networks)."""

from __future__ import annotations

import numpy as np
import torch

IDENTITY = {"name": "fake", "pretrained": None, "embed_dim": 8, "preprocess": {"size": 8}, "fingerprint": "abc"}


def tiny_store(path, n: int = 5) -> str:
    """A store of ``n`` random 8-d records at random latitudes in [−60, 60] (keys rec/0, rec/1, …)."""
    from geopipe.pipeline.store.format import ShardStat
    from geopipe.pipeline.store.writer import StoreWriter

    rng = np.random.default_rng(0)
    latlon = np.column_stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)])
    with StoreWriter.open(str(path), backbone=IDENTITY, embed_dim=8, dtype="float32", normalize=True, created_by={"version": "t"}) as w:
        w.append_shard("a.tar", rng.normal(size=(n, 8)), latlon, [f"rec/{i}" for i in range(n)], {}, [], ShardStat(1, 0.0))
    return str(path)


def untrained_checkpoint(path, name: str = "vmf") -> str:
    """A checkpoint of method ``name`` with a randomly initialised 2-block, 16-wide network (seed 0)."""
    from geopipe.pipeline.artifacts.checkpoint import save_checkpoint
    from geopipe.pipeline.methods.registry import get_method
    from geopipe.pipeline.model.network import NetworkConfig

    method = get_method(name)
    net = NetworkConfig(input_dim=3, dim=16, depth=2, expansion=2, cond_dim=8)
    torch.manual_seed(0)
    model = method.build_model(net)
    config = {"method": method.to_dict(), "network": net.to_dict(), "embed_dim": 8, "backbone": IDENTITY, "step": 0}
    save_checkpoint(path, model_state=model.state_dict(), config=config)
    return str(path)

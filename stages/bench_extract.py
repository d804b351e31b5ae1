"""Extraction benchmark: is the backbone the bottleneck, and does memory stay flat with more shards?

:func:`bench_extract` writes synthetic JPEG shards, then in one process and with one loaded
backbone measures

* ``bare_images_per_s``: forward passes on pre-made (B, 3, H, W) tensors already on the
  device — the ceiling (measured before and after the extract run, to expose load drift);
* ``extract_images_per_s``: the whole extract loop (tar reading, JPEG decoding and
  preprocessing in DataLoader workers, forward passes, normalisation, store commits) with
  the same model, batch size, precision and torch threads;
* ``ratio`` = extract / mean(bare): 1.0 means decoding and writing are fully hidden.

:func:`bench_extract_dask` times ``geopipe extract`` of the same shards in one process and on a
``local:N`` LocalCluster (workers embed whole shards, the client commits them in order) and
checks the two stores are identical.

Peak RSS of extract is measured in child processes for a few shard counts (each shard the
same size): the main process's high-water mark (``VmHWM``: ``ru_maxrss`` would inherit the
parent's across exec), the largest DataLoader worker's ``ru_maxrss`` (it counts pages still
shared with the main process after fork), and a baseline child that only imports and loads
the backbone (shard count 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

__all__ = ["write_bench_shards", "bench_extract", "bench_extract_dask"]

_RSS_CHILD = """
import json, sys, threading
import psutil
from geopipe.stages.extract import ExtractConfig, run_extract
args, peak, done = json.loads(sys.argv[1]), {"workers": 0}, threading.Event()

def poll():  # DataLoader workers come and go: sample their RSS every 20 ms
    me = psutil.Process()
    while not done.wait(0.02):
        try:
            peak["workers"] = max([peak["workers"]] + [k.memory_info().rss for k in me.children(recursive=True)])
        except psutil.Error:
            pass

threading.Thread(target=poll, daemon=True).start()
if args.pop("baseline"):
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone
    from geopipe.pipeline.core.device import resolve_device
    c = ExtractConfig(**args)
    load_backbone(BackboneSpec(c.backbone, c.pretrained), device=resolve_device(c.device))
    n_ok = 0
else:
    n_ok = run_extract(ExtractConfig(**args)).n_ok
done.set()
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(json.dumps({"self_kb": hwm, "workers_kb": peak["workers"] / 1024, "n_ok": n_ok}))
"""


def _image(rng: np.random.Generator, px: int) -> bytes:
    """A photo-like JPEG (smooth colour gradients + texture), ~20-40 kB at 256 px."""
    import io

    from PIL import Image

    yy, xx = np.mgrid[0:px, 0:px] / px
    base = rng.uniform(0, 255, 3) * (1 - yy[..., None]) + rng.uniform(0, 255, 3) * xx[..., None]
    img = np.clip(base * 0.7 + rng.normal(0, 25, (px, px, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_bench_shards(out: str, n_shards: int, per_shard: int, px: int, seed: int = 0) -> list[str]:
    """``n_shards`` WebDataset tars of ``per_shard`` photo-like ``px``-pixel JPEGs with random
    coordinates under ``out``; returns their paths."""
    from geopipe.pipeline.ingest.shards import write_shards

    rng = np.random.default_rng(seed)
    samples = ({"__key__": f"b{i:07d}", "jpg": _image(rng, px),
                "json": {"latitude": float(rng.uniform(-90, 90)), "longitude": float(rng.uniform(-180, 180))}}
               for i in range(n_shards * per_shard))
    return write_shards(out, samples, "bench", per_shard)


def _bare(bb, batch_size: int, n_batches: int, precision: str) -> float:
    """Images/s of ``bb.encode`` on one pre-made batch already on the model's device."""
    import torch

    size = bb.identity["preprocess"]["size"]
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(batch_size, 3, h, w, generator=torch.Generator().manual_seed(0)).to(bb.device)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)
    bb.encode(x, precision)
    sync()
    t0 = time.perf_counter()
    for _ in range(n_batches):
        z = bb.encode(x, precision)
    z.cpu()
    sync()
    return batch_size * n_batches / (time.perf_counter() - t0)


def _peak_rss(workdir: str, n_shards: int, per_shard: int, px: int, opts: dict) -> dict:
    """Peak RSS (MiB) of a child extracting ``n_shards`` shards (n_shards=0: baseline, no extract)."""
    shards = write_bench_shards(os.path.join(workdir, f"rss{n_shards}"), max(n_shards, 1), per_shard, px, seed=n_shards)
    args = {**opts, "shards": shards, "store": os.path.join(workdir, f"rss{n_shards}.zarr"), "progress": False,
            "baseline": n_shards == 0}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # memory, not speed, is measured here
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, json.dumps(args)], cwd=root, capture_output=True, text=True,
                         check=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"main_mib": got["self_kb"] / 1024, "workers_mib": got["workers_kb"] / 1024, "rows": got["n_ok"]}


def bench_extract(*, backbone: str = "ViT-B-32", pretrained: str | None = "random", device: str = "cpu",
                  batch_size: int = 32, num_workers: int = 1, n_images: int = 256, n_shards: int = 4,
                  image_px: int = 256, precision: str = "auto", rss_shards: tuple[int, ...] = (2, 20),
                  rss_images_per_shard: int = 64, rss_backbone: str = "tiny", workdir: str | None = None) -> dict:
    """Run the benchmark (see the module docstring) and return its numbers as a JSON-able dict.

    backbone/pretrained: the model to time ("ViT-B-32" with pretrained="random" is a random-
    initialised open_clip ViT-B/32, no download). rss_backbone: the model of the RSS children
    (the data plane's memory is the question; "tiny" keeps them fast). rss_shards=() skips RSS.
    """
    import torch

    from geopipe.pipeline.core.device import resolve_device
    from geopipe.pipeline.vision.backbones import BackboneSpec, load_backbone
    from geopipe.stages.extract import ExtractConfig, run_extract

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        shards = write_bench_shards(os.path.join(tmp, "shards"), n_shards, -(-n_images // n_shards), image_px)
        cfg = ExtractConfig(shards=tuple(shards), store=os.path.join(tmp, "bench.zarr"), backbone=backbone,
                            pretrained=pretrained, batch_size=batch_size, num_workers=num_workers, device=device,
                            precision=precision, progress=False)
        bb = load_backbone(BackboneSpec(cfg.backbone, cfg.pretrained), device=resolve_device(device))
        n_batches = max(1, n_images // batch_size)
        bare_before = _bare(bb, batch_size, n_batches, precision)
        res = run_extract(cfg, backbone=bb)
        bare_after = _bare(bb, batch_size, n_batches, precision)
        bare = (bare_before + bare_after) / 2
        rss = {}
        if rss_shards:
            opts = {"backbone": rss_backbone, "batch_size": batch_size, "num_workers": num_workers, "device": device}
            rss = {str(n): _peak_rss(tmp, n, rss_images_per_shard, image_px, opts) for n in (0, *rss_shards)}
    return {
        "backbone": backbone, "pretrained": pretrained, "device": str(bb.device), "precision": precision,
        "torch_threads": torch.get_num_threads(), "batch_size": batch_size, "num_workers": num_workers,
        "n_images": res.n_ok + res.n_rejected, "image_px": image_px,
        "extract_images_per_s": res.images_per_s, "bare_images_per_s": bare,
        "bare_before_after": [bare_before, bare_after], "ratio": res.images_per_s / bare,
        "rss_backbone": rss_backbone, "rss_images_per_shard": rss_images_per_shard, "peak_rss": rss,
        "cpu_count": os.cpu_count(), "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
    }


def bench_extract_dask(*, backbone: str = "ViT-B-32", pretrained: str | None = "random", device: str = "cpu",
                       batch_size: int = 32, num_workers: int = 2, workers: int = 2, n_images: int = 192, n_shards: int = 8,
                       image_px: int = 128, workdir: str | None = None) -> dict:
    """Images/s of extract in one process (``num_workers`` decode workers) vs ``--dask local:<workers>``.

    images_per_s: samples per second of the decode/embed/commit loop (cluster start and model
    loads excluded); wall_s: the whole stage, cluster start and backbone loads included.
    ratio = dask / single-process (loop and wall). identical: the two stores hold the same
    bytes (embeddings, keys, coordinates, shard records).
    """
    import torch

    from geopipe.pipeline.store.reader import read_store
    from geopipe.stages.extract import ExtractConfig, run_extract

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        shards = write_bench_shards(os.path.join(tmp, "shards"), n_shards, -(-n_images // n_shards), image_px)
        runs = {}
        for name, dask in (("single", None), ("dask", f"local:{workers}")):
            cfg = ExtractConfig(shards=tuple(shards), store=os.path.join(tmp, f"{name}.zarr"), backbone=backbone,
                                pretrained=pretrained, batch_size=batch_size, num_workers=num_workers, device=device,
                                progress=False, dask=dask)
            t0 = time.perf_counter()
            res = run_extract(cfg)
            runs[name] = {"images_per_s": res.images_per_s, "wall_s": time.perf_counter() - t0, "n_images": res.n_ok + res.n_rejected}
        a, b = read_store(os.path.join(tmp, "single.zarr")), read_store(os.path.join(tmp, "dask.zarr"))
        identical = (a.keys.tolist() == b.keys.tolist() and np.array_equal(a.embeddings, b.embeddings)
                     and np.array_equal(a.latlon, b.latlon) and a.attrs["shards"] == b.attrs["shards"])
    single, dask = runs["single"], runs["dask"]
    return {
        "backbone": backbone, "pretrained": pretrained, "device": device, "batch_size": batch_size, "image_px": image_px,
        "n_images": single["n_images"], "n_shards": n_shards, "single_process": {**single, "decode_workers": num_workers,
                                                                                   "torch_threads": torch.get_num_threads()},
        "dask": {**dask, "workers": workers}, "ratio_loop": dask["images_per_s"] / single["images_per_s"],
        "ratio_wall": single["wall_s"] / dask["wall_s"], "identical": bool(identical),
        "cpu_count": os.cpu_count(), "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
    }

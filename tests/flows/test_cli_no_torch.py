"""Commands that make no tensor load no torch: ``geopipe import``, ``store info|verify|repair`` and
``evaluate`` of point predictions (with a constant baseline) run in a fresh interpreter and
``torch`` is never in ``sys.modules`` (torch alone is ~0.5 GB of RSS and ~2 s of start-up)."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = r"""
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from click.testing import CliRunner
from geopipe.flows.cli import cli
from geopipe.pipeline.sphere.geometry import haversine_km
from geopipe.schemas.predictions import METADATA_KEY, PREDICTIONS_SCHEMA, PREDICTIONS_SCHEMA_ID

tmp, n = sys.argv[1], 64
rng = np.random.default_rng(0)
os.makedirs(f"{tmp}/emb/img_emb"); os.makedirs(f"{tmp}/emb/metadata")
np.save(f"{tmp}/emb/img_emb/img_emb_0.npy", rng.normal(size=(n, 16)).astype(np.float32))
lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
pq.write_table(pa.table({"key": [f"k{i}" for i in range(n)], "latitude": lat, "longitude": lon}),
               f"{tmp}/emb/metadata/metadata_0.parquet")
plat, plon = lat + rng.normal(0, 2, n), np.clip(lon + rng.normal(0, 2, n), -180, 180)
cols = {"key": [f"k{i}" for i in range(n)], "lat": plat, "lon": plon, "true_lat": lat, "true_lon": lon,
        "distance_km": haversine_km(plat, plon, lat, lon), "log_likelihood": rng.normal(1, 0.5, n), "hdr_rank": rng.integers(0, 17, n) / 16}
table = pa.Table.from_arrays([pa.array(cols.get(f.name, [None] * n), type=f.type) for f in PREDICTIONS_SCHEMA], schema=PREDICTIONS_SCHEMA)
meta = {"schema": PREDICTIONS_SCHEMA_ID, "config": {"steps": 16}, "model": {"method": "rfm", "space": "sphere"}}
pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()}), f"{tmp}/p.parquet")
store = f"{tmp}/s.zarr"
runs = {
    "import": ["import", f"{tmp}/emb", "--store", store, "--backbone-name", "StreetCLIP"],
    "store info": ["store", "info", store],
    "store verify": ["store", "verify", store],
    "store repair": ["store", "repair", store],
    "evaluate": ["evaluate", f"{tmp}/p.parquet", "--baseline-store", store, "-o", f"{tmp}/r.json"],
}
out = {}
for name, args in runs.items():
    res = CliRunner().invoke(cli, args)
    out[name] = {"exit": res.exit_code, "torch": "torch" in sys.modules, "output": res.output[-300:]}
print(json.dumps(out))
"""


def test_torch_free_commands_load_no_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], capture_output=True, text=True, cwd="/", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(out) == ["import", "store info", "store verify", "store repair", "evaluate"]
    for name, got in out.items():
        assert got["exit"] == 0, (name, got["output"])
        assert not got["torch"], f"geopipe {name} imported torch"
    model, baseline = json.loads((tmp_path / "r.json").read_text())["reports"]
    assert model["prdc"]["n_real"] == 64 and model["calibration"]["n"] == 64 and model["nll"] is not None
    assert baseline["method"] == "constant" and baseline["distance"]["n"] == 64

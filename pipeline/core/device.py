"""Device selection shared by the stages."""

from __future__ import annotations

import torch

from geopipe.pipeline.core.errors import ConfigError

__all__ = ["resolve_device", "set_cpu_threads"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA device when available, else CPU; otherwise ``torch.device(name)``.

    Raises ValueError for a CUDA device on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return dev


def set_cpu_threads(n: int) -> None:
    """Use ``n`` CPU threads for torch's operators in this process, and in processes it starts
    (decode workers, local Dask workers) through ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``.

    geopipe's networks are small: on a shared or loaded machine OpenMP threads spin-waiting for
    busy cores made two threads 3–18× slower than one (measured on the 2-core machine)."""
    import os

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {n!r}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)

"""Array-library dispatch: the same kernel runs on NumPy, CuPy and torch tensors.

Kernels call `array_namespace` on their input and use the module it returns; CuPy and torch
are imported only when an array of theirs is seen, never at module level.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import numpy as np

from diffdask.errors import BackendError


def array_namespace(x: Any) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) that ``x`` belongs to.

    Parameters
    ----------
    x : array
        A NumPy array, NumPy scalar, or CuPy array.
    """
    module = type(x).__module__.split(".", 1)[0]
    if module == "cupy":
        return importlib.import_module("cupy")
    return np


def gpu_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    if importlib.util.find_spec("cupy") is None:
        return False
    cupy = importlib.import_module("cupy")
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CuPy raises its own CUDARuntimeError when no driver is present
        return False


def to_gpu(x: Any) -> Any:
    """Move data to the current CUDA device: a NumPy array as a CuPy array, a frame stack lazily.

    A frame stack (an `xarray.Dataset` with ``frames``) keeps its chunks; each chunk becomes a
    CuPy array when it is computed, so the graph builders (e.g. `diffdask.summarize`) run
    their GPU kernels on it.

    Raises
    ------
    BackendError
        When CuPy or a CUDA device is not available.
    """
    if not gpu_available():
        raise BackendError(
            "no CUDA device is usable here (CuPy missing or no GPU); install diffdask[gpu] on a "
            "GPU node, or leave the data on the CPU."
        )
    cupy = importlib.import_module("cupy")
    if hasattr(x, "data_vars") and "frames" in x:
        import dask.array as da

        frames = x["frames"].data
        if not isinstance(frames, da.Array):
            frames = da.asarray(frames)
        moved = frames.map_blocks(cupy.asarray, meta=cupy.empty((0,) * frames.ndim, dtype=frames.dtype))
        return x.assign(frames=(x["frames"].dims, moved, x["frames"].attrs))
    return cupy.asarray(x)


def to_cpu(x: Any) -> np.ndarray:
    """A NumPy array from a NumPy, CuPy or torch array (copied off the GPU when needed)."""
    module = type(x).__module__.split(".", 1)[0]
    if module == "cupy":
        return x.get()
    if module == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_torch(x: Any, device: str = "cpu") -> Any:
    """A torch tensor on ``device`` sharing memory with ``x`` where possible (DLPack on GPU)."""
    torch = importlib.import_module("torch")
    if type(x).__module__.split(".", 1)[0] == "cupy":
        return torch.from_dlpack(x).to(device)
    return torch.as_tensor(np.asarray(x)).to(device)

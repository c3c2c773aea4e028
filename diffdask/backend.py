"""Array-library dispatch: the same kernel runs on NumPy, CuPy and torch tensors.

`library_of` is the one place that tells which library holds an array; everything else
(`array_namespace`, `to_cpu`, `to_torch`, the CuPy sparse operators of the common lines)
asks it. Kernels call `array_namespace` on their input and use the namespace it returns; CuPy
and torch are imported only when an array of theirs is seen, never at module level.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any

import numpy as np

from diffdask.errors import BackendError

#: The array libraries diffdask kernels run on.
LIBRARIES = ("numpy", "cupy", "torch")


def library_of(x: Any) -> str:
    """Which array library holds ``x``: ``"numpy"``, ``"cupy"`` or ``"torch"``.

    Anything that is not a CuPy array or a torch tensor (NumPy arrays and scalars, Python
    numbers, lists) counts as NumPy. Read from the type's module, so neither CuPy nor torch
    is imported to ask.
    """
    module = type(x).__module__.split(".", 1)[0]
    return module if module in ("cupy", "torch") else "numpy"


def array_namespace(x: Any) -> ModuleType:
    """The array namespace of ``x``: ``numpy``, ``cupy``, or the array-API view of torch.

    NumPy and CuPy give their own modules (kernels use NumPy's full API, which CuPy mirrors);
    a torch tensor gives `array_api_compat`'s torch namespace, so ``xp.sum(a, axis=0)``,
    ``xp.where`` and ``xp.asarray`` mean the same on all three.

    Parameters
    ----------
    x : array
        A NumPy array or scalar, a CuPy array, or a torch tensor.
    """
    library = library_of(x)
    if library == "numpy":
        return np
    if library == "cupy":
        return importlib.import_module("cupy")
    from array_api_compat import array_namespace as compat_namespace

    return compat_namespace(x)


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
    library = library_of(x)
    if library == "cupy":
        return x.get()
    if library == "torch":
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_torch(x: Any, device: str = "cpu") -> Any:
    """A torch tensor on ``device`` sharing memory with ``x`` where possible (DLPack on GPU)."""
    torch = importlib.import_module("torch")
    library = library_of(x)
    if library == "torch":
        return x.to(device)
    if library == "cupy":
        return torch.from_dlpack(x).to(device)
    return torch.as_tensor(np.asarray(x)).to(device)

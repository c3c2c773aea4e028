"""Torch models mapped over frame chunks: each worker loads the weights once, from a path.

The model never travels in the Dask graph: a `ModelPlugin` registered with the distributed
client loads the weights file on every worker (``torch.load(weights_only=True)``), and the
per-chunk kernel finds it in a per-process cache (loading it there too without a client).
Torch runs one thread per Dask thread so the two never oversubscribe the cores; CUDA is used
when present (inputs staged through pinned memory, NumPy returned).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from dask.base import tokenize

from diffdask.blocks import map_frames
from diffdask.checks import check_int
from diffdask.errors import ParameterError, SchemaError
from diffdask.frames import checked
from diffdask.ml.models import ModelFileError, ModelSpec, load_model
from diffdask.ml.preprocess import Preprocess

_MODELS: dict[tuple[str, float, str], tuple[Any, ModelSpec]] = {}
#: How many times this process loaded each model file (the tests check "once per worker").
LOADS: Counter = Counter()


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but torch sees no CUDA device here.")
    return device


def cached_model(path: str, device: str) -> tuple[Any, ModelSpec]:
    """The model at ``path`` on ``device``, loaded once per process (per file version)."""
    weights = str(Path(path).with_suffix(".pt").resolve())
    key = (weights, os.path.getmtime(weights) if os.path.exists(weights) else 0.0, device)
    if key not in _MODELS:
        _MODELS[key] = load_model(weights, device)
        LOADS[weights] += 1
    return _MODELS[key]


def _model_plugin_class() -> type:
    from distributed import WorkerPlugin

    class ModelPlugin(WorkerPlugin):
        """Loads model files on every worker as it joins (and on workers started later)."""

        def __init__(self, paths: Sequence[str], device: str) -> None:
            self.paths, self.device = list(paths), device
            self.name = f"diffdask-models-{tokenize(self.paths, device)}"

        def setup(self, worker: Any) -> None:
            import torch

            # One torch thread per Dask thread: Dask threads × torch threads = cores.
            torch.set_num_threads(1)
            for p in self.paths:
                cached_model(p, _resolve_device(self.device))

    return ModelPlugin


def mirror_views(x: Any) -> list[Any]:
    """A batch ``(n, c, h, w)`` and its mirrors along each image axis and both (4 views).

    The test-time augmentation of Assalauova et al. (2022): five models × four views give the
    20 predictions per pattern that their ensemble averages.
    """
    import torch

    return [x, torch.flip(x, dims=(-1,)), torch.flip(x, dims=(-2,)), torch.flip(x, dims=(-2, -1))]


def _predict_kernel(
    block: np.ndarray,
    paths: Sequence[str],
    device: str,
    batch_size: int,
    mirror: bool,
    mask: np.ndarray,
    center: tuple[float, float],
    preprocess: dict[str, Any],
) -> dict[str, np.ndarray]:
    import torch

    dev = _resolve_device(device)
    inputs = Preprocess.from_dict(preprocess).apply(block, mask, center)
    total = None
    for path in paths:
        model, spec = cached_model(path, dev)
        outs = []
        with torch.inference_mode():
            for start in range(0, inputs.shape[0], batch_size):
                x = torch.from_numpy(inputs[start : start + batch_size])
                x = x.pin_memory().to(dev, non_blocking=True) if dev.startswith("cuda") else x
                views = mirror_views(x) if mirror else [x]
                y = None
                for v in views:
                    out = model(v)
                    out = torch.softmax(out, dim=1) if spec.kind == "classifier" else out
                    y = out if y is None else y + out
                outs.append((y / len(views)).double().cpu().numpy())
        result = np.concatenate(outs) if outs else np.zeros((0, len(spec.outputs)))
        if spec.output_std:
            result = result * np.asarray(spec.output_std) + np.asarray(spec.output_mean)
        total = result if total is None else total + result
    return {"outputs": (total / len(paths)).astype(np.float32)}


def predict(
    ds: xr.Dataset,
    model: str | Sequence[str],
    batch_size: int = 256,
    device: str = "auto",
    mirror: bool = False,
) -> xr.Dataset:
    """Lazy per-frame model outputs, aligned on ``frame``.

    Parameters
    ----------
    ds : xarray.Dataset
        Frame stack.
    model : str or sequence of str
        Weights path(s) with their JSON sidecars; several paths form an ensemble whose outputs
        (softmax probabilities for classifiers) are averaged.
    batch_size : int
        Frames per forward pass.
    device : str
        "auto" (CUDA when present), "cpu" or "cuda[:N]".
    mirror : bool
        Test-time augmentation for classifiers: average over the frame and its mirrors along
        each axis and both (`mirror_views`; with a 5-model ensemble, 20 predictions per frame).

    Returns
    -------
    xarray.Dataset
        ``probabilities`` (classifiers) or ``predictions`` (regressors), dims (frame, output),
        with the output names as coordinate; attrs record the models.

    Raises
    ------
    ModelFileError, StoreNotFoundError
        Missing or unsafe model files, or an ensemble of models that disagree.
    SchemaError
        Frames whose shape cannot give the model's input patch.
    """
    stack = checked(ds)
    paths = [str(Path(p).with_suffix(".pt").resolve()) for p in ([model] if isinstance(model, (str, os.PathLike)) else model)]
    if not paths:
        raise ParameterError("predict needs at least one model path.")
    batch_size = check_int("batch_size", batch_size, 1, what="frames")
    specs = [load_model(p, "cpu")[1] for p in paths]
    first = specs[0]
    if any(s.outputs != first.outputs or s.preprocess != first.preprocess or s.kind != first.kind for s in specs):
        raise ModelFileError("ensemble members must share outputs, preprocessing and kind; these differ.")
    if mirror and first.kind != "classifier":
        raise ParameterError("mirroring is a test-time augmentation for classifiers only.")
    prep = Preprocess.from_dict(first.preprocess)
    frame_shape = stack.frame_shape
    needed = first.input_shape
    patch = prep.crop or frame_shape
    if needed and tuple(patch) != tuple(needed):
        raise SchemaError(
            f"this {first.architecture} was trained on {needed[0]}×{needed[1]} patches but these "
            f"{frame_shape[0]}×{frame_shape[1]} frames give {patch[0]}×{patch[1]}; resample the frames or retrain."
        )
    geometry = stack.geometry
    center = geometry.beam_center_yx if geometry else ((frame_shape[0] - 1) / 2, (frame_shape[1] - 1) / 2)
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        client.register_plugin(_model_plugin_class()(paths, device))
    n_out = len(first.outputs)
    out = map_frames(
        _predict_kernel,
        stack.frames,
        {"outputs": ((n_out,), np.float32)},
        kwargs={"paths": paths, "device": device, "batch_size": int(batch_size), "mirror": bool(mirror),
                "mask": stack.mask, "center": tuple(center), "preprocess": first.preprocess},
        name="predict",
    )
    name = "probabilities" if first.kind == "classifier" else "predictions"
    return xr.Dataset(
        {name: (("frame", "output"), out["outputs"])},
        coords={"output": list(first.outputs)},
        attrs={"models": paths, "mirror": int(mirror), "architecture": first.architecture},
    )

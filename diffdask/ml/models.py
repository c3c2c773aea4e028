"""Model files: weights (``state_dict``, loaded with ``weights_only=True``) plus a JSON sidecar.

``model.pt`` holds tensors only; ``model.json`` names the architecture and its arguments, the
preprocessing the model expects, its outputs, and the diffdask version. A weights file that
carries pickled code is refused, never executed.
"""

from __future__ import annotations

import inspect
import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffdask._version import __version__
from diffdask.errors import DiffdaskError, ParameterError, StoreNotFoundError
from diffdask.ml.nets import ARCHITECTURES, build


class ModelFileError(DiffdaskError, ValueError):
    """A model file is unsafe, corrupt, or does not match its sidecar."""


@dataclass
class ModelSpec:
    """What a model file's sidecar says.

    Attributes
    ----------
    architecture : str
        Registered class name (`diffdask.ml.nets.ARCHITECTURES`).
    kwargs : dict
        Constructor arguments.
    preprocess : dict
        `diffdask.ml.preprocess.Preprocess` fields (crop, scaling).
    outputs : list of str
        Names of the output columns (e.g. ``["single", "other"]``).
    kind : str
        "classifier" (softmax probabilities) or "regressor" (raw values).
    input_shape : list of int
        ``[height, width]`` of the patches the model was trained on (empty: any).
    output_mean, output_std : list of float
        Regressors are trained on standardised targets; predictions are ``raw · std + mean``.
    """

    architecture: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    kind: str = "classifier"
    input_shape: list[int] = field(default_factory=list)
    output_mean: list[float] = field(default_factory=list)
    output_std: list[float] = field(default_factory=list)
    diffdask_version: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classifier", "regressor"):
            raise ParameterError(f"kind must be 'classifier' or 'regressor', got {self.kind!r}.")


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".pt", ".json") else p
    return stem.with_suffix(".pt"), stem.with_suffix(".json")


def save_model(model: nn.Module, path: str | Path, spec: ModelSpec) -> Path:
    """Write ``model``'s weights and its sidecar; return the weights path."""
    weights, sidecar = _paths(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    spec.diffdask_version = __version__
    # Every constructor argument is written, defaults included, so that a later change of a
    # default cannot rebuild a different network around these weights.
    if spec.architecture in ARCHITECTURES:
        parameters = inspect.signature(ARCHITECTURES[spec.architecture].__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        spec.kwargs = {**defaults, **spec.kwargs}
    torch.save(model.state_dict(), weights)
    sidecar.write_text(json.dumps(asdict(spec), indent=1))
    return weights


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model from its sidecar and load its weights safely, in eval mode.

    Raises
    ------
    StoreNotFoundError
        Weights or sidecar missing.
    ModelFileError
        The weights carry pickled code, are corrupt, or do not fit the sidecar's architecture.
    """
    weights, sidecar = _paths(path)
    for f in (weights, sidecar):
        if not f.is_file():
            raise StoreNotFoundError(
                f"model file {str(f)!r} is missing; a diffdask model is a .pt weights file with its .json sidecar."
            )
    try:
        spec = ModelSpec(**json.loads(sidecar.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise ModelFileError(f"{str(sidecar)!r} is not a diffdask model sidecar: {exc}") from exc
    with open(weights, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise ModelFileError(
            f"{str(weights)!r} is not a torch weights file (torch.save writes a zip archive; this is "
            "something else, or a truncated or corrupt copy). Copy it again, or save models with "
            "diffdask.ml.save_model."
        )
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"{str(weights)!r} holds pickled objects, not only tensors; it is refused (loading it could run "
            "arbitrary code). Save models with diffdask.ml.save_model."
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelFileError(f"{str(weights)!r} cannot be read as torch weights: {exc}") from exc
    model = build(spec.architecture, spec.kwargs)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise ModelFileError(
            f"weights {str(weights)!r} do not fit the sidecar's {spec.architecture}({spec.kwargs}): {exc}"
        ) from exc
    return model.to(device).eval(), spec

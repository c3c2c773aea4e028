"""Training: the single-hit classifier recipe of Assalauova et al. (2022), configurable.

Minibatches are drawn so that on average ``positive_fraction`` of the samples are positives
(2 % for "MaxF1", 5 % with cross-entropy weights 0.1/0.9 for the high-recall "moreSH"),
Adam at 1e-4, batch 64, polynomial learning-rate decay, augmentations (`Augment`), stratified
k-fold cross-validation whose k models form the ensemble that `predict` averages. Training
checkpoints every ``checkpoint_every`` steps and resumes from the last checkpoint; with one
seed the weights are the same on every run. This is an iterative algorithm: the labelled
frames are preprocessed once (a Dask map over the stack) and held in memory as a NumPy array.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from diffdask.blocks import map_frames
from diffdask.errors import ParameterError, SchemaError
from diffdask.frames import checked, validate
from diffdask.ml.augment import Augment
from diffdask.ml.models import ModelSpec, save_model
from diffdask.ml.nets import build
from diffdask.ml.preprocess import Preprocess


@dataclass
class TrainConfig:
    """Hyper-parameters of a training run (the paper's values by default)."""

    architecture: str = "HitClassifier"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocess: Preprocess = field(default_factory=lambda: Preprocess(crop=(192, 96)))
    positive_fraction: float = 0.02
    class_weights: tuple[float, float] | None = None
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-4
    lr_power: float = 0.9
    k_folds: int = 5
    augment: Augment | None = field(default_factory=Augment)
    checkpoint_every: int = 200
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.positive_fraction < 1:
            raise ParameterError(f"positive_fraction must be in (0, 1), got {self.positive_fraction}.")
        if self.k_folds < 2:
            raise ParameterError(f"k_folds must be ≥ 2 (an ensemble of k models), got {self.k_folds}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ParameterError("steps and batch_size must be ≥ 1.")


def _inputs_kernel(block: np.ndarray, preprocess: dict[str, Any], mask: np.ndarray,
                   center: tuple[float, float]) -> dict[str, np.ndarray]:
    return {"x": Preprocess.from_dict(preprocess).apply(block, mask, center)}


def network_inputs(ds: xr.Dataset, preprocess: Preprocess) -> np.ndarray:
    """All frames of ``ds`` preprocessed for a network, as a float32 ``(n, 1, h, w)`` array."""
    stack = checked(ds)
    shape, geometry = stack.frame_shape, stack.geometry
    center = geometry.beam_center_yx if geometry else ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    h, w = preprocess.crop or shape
    out = map_frames(_inputs_kernel, stack.frames, {"x": ((1, h, w), np.float32)},
                     kwargs={"preprocess": preprocess.to_dict(), "mask": stack.mask, "center": tuple(center)},
                     name="network-inputs")
    return np.asarray(out["x"].compute())


def _labels(ds: xr.Dataset, label: str) -> np.ndarray:
    if label not in ds.variables:
        raise SchemaError(f"the stack has no per-frame label {label!r}; it has {sorted(map(str, ds.data_vars))}.")
    y = np.asarray(ds[label].values)
    if y.ndim != 1:
        raise SchemaError(f"label {label!r} must be one value per frame, got shape {y.shape}.")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise SchemaError(f"label {label!r} holds a single class; training needs positives and negatives.")
    return y


def _optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """Adam at ``config.learning_rate`` with the polynomial decay to zero over ``config.steps``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / config.steps) ** config.lr_power)
    return optimizer, schedule


def _train_one(x: np.ndarray, y: np.ndarray, config: TrainConfig, folder: Path, seed: int,
               progress: Callable[[int, int, float], None] | None) -> nn.Module:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build(config.architecture, config.arch_kwargs)
    optimizer, schedule = _optimizer(model, config)
    weights = None if config.class_weights is None else torch.tensor(config.class_weights, dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=weights)
    start = 0
    checkpoint = folder / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start = int(state["step"])
    # Positives drawn with probability positive_fraction on average, whatever the class balance.
    p = np.where(y, config.positive_fraction / y.sum(), (1 - config.positive_fraction) / (~y).sum())
    p_t = torch.from_numpy(p / p.sum())
    # Targets: class 0 = positive ("single"), class 1 = other, matching the outputs' order.
    targets = torch.from_numpy(np.where(y, 0, 1))
    inputs = torch.from_numpy(x)
    model.train()
    for step in range(start, config.steps):
        idx = torch.multinomial(p_t, config.batch_size, replacement=True, generator=generator)
        batch = inputs[idx]
        if config.augment is not None:
            batch = config.augment(batch, generator)
        optimizer.zero_grad()
        loss = loss_fn(model(batch), targets[idx])
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, config.steps, loss.item())
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "generator": generator.get_state(),
                        "step": step + 1}, tmp)
            tmp.replace(checkpoint)
    return model.eval()


@dataclass
class TrainResult:
    """Ensemble members and their cross-validation scores."""

    models: list[str]
    folds: list[dict[str, float]]

    @property
    def mean_f1(self) -> float:
        return float(np.mean([f["f1"] for f in self.folds]))


def train_classifier(
    ds: xr.Dataset,
    label: str,
    out: str,
    config: TrainConfig | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> TrainResult:
    """Train a k-fold ensemble of hit classifiers on the labelled frames of ``ds``.

    Parameters
    ----------
    ds : xarray.Dataset
        Frame stack with a boolean per-frame ``label`` (True = positive, e.g. single hit).
    label : str
        Name of the label variable.
    out : str
        Directory for the ensemble (``fold_K/model.pt`` + ``.json``) and ``training.json``.
    config : TrainConfig, optional
        Hyper-parameters.
    progress : callable, optional
        ``progress(step, total, loss)`` after each optimisation step.

    Returns
    -------
    TrainResult
        Model paths (pass them to `predict` as an ensemble) and per-fold validation precision,
        recall and F1 at threshold 0.5.
    """
    from sklearn.model_selection import StratifiedKFold

    from diffdask.metrics import precision_recall_f1

    config = config or TrainConfig()
    validate(ds)
    y = _labels(ds, label)
    if min(y.sum(), (~y).sum()) < config.k_folds:
        raise SchemaError(f"label {label!r} needs at least {config.k_folds} frames of each class for {config.k_folds}-fold "
                          "cross-validation.")
    x = network_inputs(ds, config.preprocess)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    folds = StratifiedKFold(config.k_folds, shuffle=True, random_state=config.seed)
    paths, scores = [], []
    for k, (train, held) in enumerate(folds.split(x, y)):
        member = folder / f"fold_{k}"
        member.mkdir(exist_ok=True)
        model = _train_one(x[train], y[train], config, member, config.seed * 1000 + k, progress)
        spec = ModelSpec(config.architecture, dict(config.arch_kwargs), config.preprocess.to_dict(), [label, "other"],
                         input_shape=list(x.shape[2:]))
        paths.append(str(save_model(model, member / "model", spec)))
        with torch.inference_mode():
            probs = torch.softmax(model(torch.from_numpy(x[held])), dim=1)[:, 0].numpy()
        predicted = probs >= 0.5
        scores.append({"fold": k, **precision_recall_f1(y[held], predicted)})
    record = {"label": label, "config": {**asdict(config), "preprocess": config.preprocess.to_dict()},
              "folds": scores, "models": paths}
    (folder / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return TrainResult(paths, scores)


def train_regressor(
    ds: xr.Dataset,
    targets: Sequence[str],
    out: str,
    config: TrainConfig | None = None,
    validation_fraction: float = 0.2,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a regressor of per-frame values (e.g. beam centre and detector tilt).

    Targets are standardised for training (mean/std kept in the sidecar so `predict` returns
    physical units). Only intensity augmentations apply (gamma, noise, blur, cutout): geometric
    ones would change the targets. A random ``validation_fraction`` (seeded) is held out.

    Returns
    -------
    dict
        ``model`` (weights path) and ``mae`` (mean absolute error per target on the held-out
        frames, in the targets' units).
    """
    config = config or TrainConfig(architecture="GeometryRegressor", preprocess=Preprocess(scale="log1p"))
    validate(ds)
    missing = [t for t in targets if t not in ds.variables]
    if missing:
        raise SchemaError(f"the stack has no per-frame targets {missing}.")
    if not 0 < validation_fraction < 1:
        raise ParameterError(f"validation_fraction must be in (0, 1), got {validation_fraction}.")
    y = np.stack([np.asarray(ds[t].values, dtype=np.float64) for t in targets], axis=1)
    mean, std = y.mean(axis=0), y.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    x = network_inputs(ds, config.preprocess)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(y))
    n_val = max(1, round(validation_fraction * len(y)))
    held, train = order[:n_val], order[n_val:]
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = build(config.architecture, {**config.arch_kwargs, "n_outputs": len(targets)})
    optimizer, schedule = _optimizer(model, config)
    # Geometric augmentations would move the targets: only the intensity ones stay on.
    intensity_only = None if config.augment is None else replace(
        config.augment, p_rotate=0, p_scale=0, p_shift=0, p_elastic=0, p_mirror=0)
    inputs = torch.from_numpy(x[train])
    goals = torch.from_numpy(((y[train] - mean) / std).astype(np.float32))
    model.train()
    for step in range(config.steps):
        idx = torch.randint(len(train), (config.batch_size,), generator=generator)
        batch = inputs[idx] if intensity_only is None else intensity_only(inputs[idx], generator)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(batch), goals[idx])
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, config.steps, loss.item())
    model.eval()
    with torch.inference_mode():
        predicted = model(torch.from_numpy(x[held])).double().numpy() * std + mean
    mae = np.abs(predicted - y[held]).mean(axis=0)
    spec = ModelSpec(config.architecture, {**config.arch_kwargs, "n_outputs": len(targets)},
                     config.preprocess.to_dict(), list(targets), kind="regressor", input_shape=list(x.shape[2:]),
                     output_mean=mean.tolist(), output_std=std.tolist())
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = save_model(model, folder / "model", spec)
    record = {"targets": list(targets), "mae": dict(zip(targets, mae.tolist())), "model": str(path)}
    (folder / "training.json").write_text(json.dumps(record, indent=1))
    return {"model": str(path), "mae": dict(zip(targets, mae.tolist()))}


def ensemble_paths(directory: str) -> Sequence[str]:
    """The member models of an ensemble written by `train_classifier`."""
    paths = sorted(str(p) for p in Path(directory).glob("fold_*/model.pt"))
    if not paths:
        raise ParameterError(f"{directory!r} holds no trained models (fold_*/model.pt).")
    return paths

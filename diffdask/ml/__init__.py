"""Neural networks over frame stacks: model files, inference mapped over partitions, nets, training.

Kept out of the top-level namespace so that ``import diffdask`` does not import torch; use
``from diffdask.ml import predict, train_classifier``.
"""

from diffdask.ml.augment import Augment
from diffdask.ml.inference import mirror_views, predict
from diffdask.ml.models import ModelFileError, ModelSpec, load_model, save_model
from diffdask.ml.nets import GeometryRegressor, HitClassifier, MLPHead
from diffdask.ml.preprocess import Preprocess
from diffdask.ml.train import (
    TrainConfig,
    TrainResult,
    ensemble_paths,
    train_classifier,
    train_regressor,
)

__all__ = [
    "Augment",
    "GeometryRegressor",
    "HitClassifier",
    "MLPHead",
    "ModelFileError",
    "ModelSpec",
    "Preprocess",
    "TrainConfig",
    "TrainResult",
    "ensemble_paths",
    "load_model",
    "mirror_views",
    "predict",
    "save_model",
    "train_classifier",
    "train_regressor",
]

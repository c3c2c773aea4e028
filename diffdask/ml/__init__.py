"""Neural networks over frame stacks: model files, inference mapped over partitions, nets."""

from diffdask.ml.inference import predict
from diffdask.ml.models import ModelFileError, ModelSpec, load_model, save_model
from diffdask.ml.nets import GeometryRegressor, HitClassifier, MLPHead
from diffdask.ml.preprocess import Preprocess

__all__ = [
    "GeometryRegressor",
    "HitClassifier",
    "MLPHead",
    "ModelFileError",
    "ModelSpec",
    "Preprocess",
    "load_model",
    "predict",
    "save_model",
]

"""The fitted latent space (`LatentModel`) and its storage as arrays + JSON attributes.

A model is stored as a Zarr group (or a results group) of plain arrays with its settings in
JSON attributes, never as a pickle, so it reads back on any version that knows its format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import xarray as xr

from diffdask.errors import SchemaError, StoreExistsError, StoreFormatError
from diffdask.latent.preprocess import FeatureLayout, Preprocessing

#: Attribute that marks a dataset as a stored latent model (and its format version).
MODEL_FORMAT = 1


@dataclass(frozen=True)
class LatentModel:
    """A fitted latent space: PCA of the preprocessed frames.

    Attributes
    ----------
    components : ndarray, shape (n_components, n_features)
        Orthonormal principal axes, signs fixed so that each axis's largest loading is positive.
    mean : ndarray, shape (n_features,)
        Mean feature vector.
    explained_variance : ndarray, shape (n_components,)
        Variance of the frames along each axis (feature units²).
    explained_variance_ratio : ndarray, shape (n_components,)
        Fraction of the total feature variance along each axis.
    n_frames : int
        Frames the model was fitted on.
    method : str
        ``"incremental"`` or ``"randomized"``.
    prep : Preprocessing
        How frames became features.
    layout : FeatureLayout
        Which detector pixels feed which feature.
    """

    components: np.ndarray
    mean: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    n_frames: int
    method: str
    prep: Preprocessing
    layout: FeatureLayout

    @property
    def n_components(self) -> int:
        """Dimension of the latent space."""
        return int(self.components.shape[0])

    def to_dataset(self) -> xr.Dataset:
        """The model as arrays + JSON-able attrs (stored by `save` or inside a results group)."""
        attrs = {
            "latent_model": {
                "format": MODEL_FORMAT,
                "method": self.method,
                "n_frames": int(self.n_frames),
                "preprocessing": asdict(self.prep),
                "frame_shape": list(self.layout.frame_shape),
                "box": list(self.layout.box),
            }
        }
        return xr.Dataset(
            {
                "components": (("component", "feature"), self.components),
                "mean": (("feature",), self.mean),
                "explained_variance": (("component",), self.explained_variance),
                "explained_variance_ratio": (("component",), self.explained_variance_ratio),
                "feature_mask": (("feature_y", "feature_x"), self.layout.feature_mask),
                "coverage": (("feature_y", "feature_x"), self.layout.coverage),
            },
            attrs=attrs,
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> LatentModel:
        """Rebuild a model from `to_dataset` output (e.g. ``open_results(store, "latent")``)."""
        meta = ds.attrs.get("latent_model")
        if isinstance(meta, str):
            meta = json.loads(meta)
        missing = [n for n in ("components", "mean", "explained_variance", "feature_mask", "coverage") if n not in ds]
        if not isinstance(meta, Mapping) or missing:
            raise SchemaError(
                "this dataset is not a stored latent model (no 'latent_model' attrs or missing "
                f"{missing}); write one with LatentModel.save or `diffdask latent`."
            )
        if meta.get("format") != MODEL_FORMAT:
            raise SchemaError(f"latent model format {meta.get('format')!r} is not {MODEL_FORMAT}; refit the model.")
        prep = Preprocessing(**meta["preprocessing"])
        fmask = np.asarray(ds["feature_mask"].values, dtype=bool)
        layout = FeatureLayout(
            tuple(int(v) for v in meta["frame_shape"]),  # type: ignore[arg-type]
            tuple(int(v) for v in meta["box"]),  # type: ignore[arg-type]
            (int(fmask.shape[0]), int(fmask.shape[1])),
            fmask,
            np.asarray(ds["coverage"].values, dtype=np.float64),
        )
        ratio = ds["explained_variance_ratio"].values if "explained_variance_ratio" in ds else None
        components = np.asarray(ds["components"].values, dtype=np.float64)
        if components.shape[1] != layout.n_features:
            raise SchemaError(
                f"stored components have {components.shape[1]} features but the feature mask selects "
                f"{layout.n_features}; the model files are inconsistent, refit."
            )
        return cls(
            components=components,
            mean=np.asarray(ds["mean"].values, dtype=np.float64),
            explained_variance=np.asarray(ds["explained_variance"].values, dtype=np.float64),
            explained_variance_ratio=np.asarray(ratio, dtype=np.float64),
            n_frames=int(meta["n_frames"]),
            method=str(meta["method"]),
            prep=prep,
            layout=layout,
        )

    def save(self, path: Any, overwrite: bool = False) -> None:
        """Write the model to a Zarr group (arrays + JSON attributes; no pickle).

        Parameters
        ----------
        path : str or os.PathLike
            Directory (or fsspec URL) of the new Zarr group.
        overwrite : bool
            Replace an existing group.
        """
        from diffdask.io.location import Location

        loc = Location.of(path, None)
        if loc.exists() and not overwrite:
            raise StoreExistsError(f"{loc.url!r} exists; pass overwrite=True to replace it.")
        self.to_dataset().to_zarr(loc.url, mode="w", zarr_format=3, consolidated=False)

    @classmethod
    def load(cls, path: Any) -> LatentModel:
        """Read a model written by `save` (or a ``results/latent`` group of a store)."""
        from diffdask.io.location import Location

        loc = Location.of(path, None)
        loc.require()
        try:
            ds = xr.open_zarr(loc.url, zarr_format=3, consolidated=False)
        except Exception as exc:  # zarr raises several kinds for "not a group"
            raise StoreFormatError(f"{loc.url!r} is not a Zarr group holding a latent model: {exc}") from None
        return cls.from_dataset(ds.load())


def explained_variance_summary(model: LatentModel) -> str:
    """One line: the explained-variance ratio of each component, in percent."""
    parts = ", ".join(f"{100 * v:.2f} %" for v in model.explained_variance_ratio)
    total = 100 * float(np.sum(model.explained_variance_ratio))
    return f"{model.n_components} components ({model.method}): {parts} (total {total:.2f} %)"

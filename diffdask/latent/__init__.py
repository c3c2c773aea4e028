"""Latent spaces of frame stacks: preprocessing, incremental/randomized PCA, outlier flags.

The sorting of single hits follows Ramalingam, Yoon & Poitevin (2020): build a low-dimensional
latent space of the frames by PCA and flag the frames that an elliptic envelope (a robust
Gaussian fit, `sklearn.covariance.EllipticEnvelope`) calls outliers. diffdask adds:

- preprocessing for photon-limited data, as kernels on blocks of frames: a central crop around
  the beam (the low-q pixels that hold the photons), downsampling by binning or by a Fourier
  low-pass crop, masked pixels handled by normalised convolution, per-frame normalisation to
  mean 1 (which removes the shot-to-shot fluence) and an optional sqrt or log;
- two fits: ``incremental`` streams the chunks in a fixed order through
  `sklearn.decomposition.IncrementalPCA` in batches of a fixed number of frames (constant
  memory, and the same model whatever the Dask chunking); ``randomized`` runs
  `dask.array.linalg.svd_compressed` over the distributed feature matrix;
- the per-frame distance from the PCA subspace (``residual``) besides the latent coordinates:
  multiple hits of particles whose size varies sit *inside* the cloud of single hits in the
  first components (their fringes average towards the mean pattern) but far from the subspace,
  so the envelope is fitted on the latent coordinates plus log(residual) by default
  (see BENCHMARKS.md, issue 6);
- models stored as arrays + JSON attributes (a Zarr group or a results group), never pickles.

Layout: `diffdask.latent.preprocess` (frames to features) and `diffdask.latent.kernels` (the
block kernels) know nothing of Dask; `diffdask.latent.model` holds the fitted model and its
storage; `diffdask.latent.pca` (fits, projection) and `diffdask.latent.outliers` (envelope,
single-hit sorting) build the Dask graphs.
"""

from diffdask.latent.model import MODEL_FORMAT, LatentModel, explained_variance_summary
from diffdask.latent.outliers import OUTLIER_METHODS, check_contamination, flag_outliers, sort_single_hits
from diffdask.latent.pca import METHODS, fit_latent, latent_features, transform
from diffdask.latent.preprocess import (
    DOWNSAMPLING,
    INTENSITY,
    MIN_COVERAGE,
    FeatureLayout,
    Preprocessing,
    feature_layout,
    preprocess_block,
)

__all__ = [
    "DOWNSAMPLING",
    "INTENSITY",
    "METHODS",
    "MIN_COVERAGE",
    "MODEL_FORMAT",
    "OUTLIER_METHODS",
    "FeatureLayout",
    "LatentModel",
    "Preprocessing",
    "check_contamination",
    "explained_variance_summary",
    "feature_layout",
    "fit_latent",
    "flag_outliers",
    "latent_features",
    "preprocess_block",
    "sort_single_hits",
    "transform",
]

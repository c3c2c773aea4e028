"""Block kernels of the latent space: features, feature moments, projection, envelope scores.

Each takes one block of frames (or of per-frame rows) and returns a dict of per-frame or
per-block arrays, as `diffdask.blocks.map_frames` / `reduce_frames` expect; none of them
knows about Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffdask.backend import to_cpu
from diffdask.latent.preprocess import preprocess_block


def features_kernel(block: Any, *, frame_offset: int, **kwargs: Any) -> dict[str, Any]:
    """Feature vectors of a block, on the CPU.

    Parameters
    ----------
    block : array, shape (n, ny, nx)
        Frames, photons (NumPy or CuPy).
    frame_offset : int
        Index of the block's first frame in the stack (for error messages).
    **kwargs
        ``prep``, ``layout``, ``mask``: as in `preprocess_block`.

    Returns
    -------
    dict
        ``features``: ndarray, shape (n, n_features), float32.
    """
    return {"features": to_cpu(preprocess_block(block, frame_offset=frame_offset, **kwargs))}


def moments_kernel(features: np.ndarray) -> dict[str, Any]:
    """Partial sums of a block of feature vectors, for the mean and total variance.

    Parameters
    ----------
    features : ndarray, shape (n, n_features)
        Feature vectors (feature units).

    Returns
    -------
    dict
        ``sum`` and ``sumsq`` (n_features,), float64: Σx and Σx² per feature; ``count``:
        the block's frames.
    """
    x = features.astype(np.float64)
    return {"sum": x.sum(axis=0), "sumsq": (x * x).sum(axis=0), "count": np.int64(x.shape[0])}


def fix_signs(components: np.ndarray) -> np.ndarray:
    """Principal axes with the largest |loading| of each made positive.

    Parameters
    ----------
    components : ndarray, shape (n_components, n_features)
        Principal axes (rows).

    Returns
    -------
    ndarray, shape (n_components, n_features)
    """
    # The sign of a principal axis is arbitrary; fix it (sklearn's convention) so that models
    # fitted twice, or by both methods, read the same way.
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


def project_kernel(block: Any, *, frame_offset: int, mean: Any, components: Any, **kwargs: Any) -> dict[str, Any]:
    """Latent coordinates and distance from the PCA subspace of a block of frames.

    Parameters
    ----------
    block, frame_offset, **kwargs
        As in `features_kernel`.
    mean : ndarray, shape (n_features,)
        Mean feature vector of the model.
    components : ndarray, shape (n_components, n_features)
        Orthonormal principal axes of the model.

    Returns
    -------
    dict
        ``latent`` (n, n_components), feature units; ``residual`` (n,): mean squared distance
        per feature from the subspace, feature units².
    """
    # The projection is a small matrix product: done on the CPU whatever the block's device.
    x = to_cpu(preprocess_block(block, frame_offset=frame_offset, **kwargs)).astype(np.float64) - mean
    z = x @ components.T
    # Squared distance from the PCA subspace (the components are orthonormal), per feature.
    residual = np.maximum((x * x).sum(axis=1) - (z * z).sum(axis=1), 0.0) / x.shape[1]
    return {"latent": z, "residual": residual}


@dataclass(frozen=True)
class Envelope:
    """The fitted robust Gaussian, as plain arrays (what `score_kernel` needs).

    Attributes
    ----------
    location : ndarray, shape (dim,)
        Robust mean of the envelope's input coordinates.
    precision : ndarray, shape (dim, dim)
        Inverse of the robust covariance.
    threshold : float
        Largest squared Mahalanobis distance of a single hit.
    """

    location: np.ndarray
    precision: np.ndarray
    threshold: float


def score_kernel(block: Any, *, envelope: Envelope) -> dict[str, Any]:
    """Squared Mahalanobis distance to the envelope and the single-hit flag of each row.

    Parameters
    ----------
    block : array, shape (n, dim)
        Envelope coordinates of n frames (latent, optionally with log residual).
    envelope : Envelope
        From `flag_outliers`' fit.

    Returns
    -------
    dict
        ``outlier_score`` (n,), squared Mahalanobis distance; ``single_hit`` (n,) bool.
    """
    d = np.asarray(block, dtype=np.float64) - envelope.location
    score = np.einsum("ij,jk,ik->i", d, envelope.precision, d)
    return {"outlier_score": score, "single_hit": score <= envelope.threshold}

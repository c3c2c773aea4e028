"""The structural landscape: low-dimensional embeddings of the common-line CC matrix.

Each average is described by its row of the CC matrix (its common-line similarity to every
other average); PCA of the rows is the paper's "CLPCA space" (Zhuang et al. 2022, §2.2.2),
and Isomap, spectral embedding and t-SNE of the same rows are its Appendix A alternatives.
These need the whole M × M matrix in memory (M² · 8 bytes: 800 MB for 10⁴ averages), so
they compute a lazy matrix; the matrix itself is the distributed part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffdask.errors import ParameterError

EMBEDDINGS = ("pca", "isomap", "spectral", "tsne")


@dataclass(frozen=True)
class CLPCA:
    """PCA of the rows of a CC matrix.

    Attributes
    ----------
    coordinates : ndarray, shape (M, n_components)
        Position of each average in CLPCA space (CLPCA-1, -2, ...).
    components : ndarray, shape (n_components, M)
        Principal axes, in the space of CC rows.
    mean : ndarray, shape (M,)
        Mean CC row.
    explained_variance_ratio : ndarray, shape (n_components,)
        Fraction of the rows' variance along each axis.
    """

    coordinates: np.ndarray
    components: np.ndarray
    mean: np.ndarray
    explained_variance_ratio: np.ndarray


def _in_memory(cc: Any) -> np.ndarray:
    """The CC matrix as a finite, square NumPy array (computing a lazy one)."""
    matrix = np.asarray(cc.compute() if hasattr(cc, "compute") else cc, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ParameterError(f"a CC matrix is square (M, M), got shape {matrix.shape}.")
    if matrix.shape[0] < 2:
        raise ParameterError(f"an embedding needs at least 2 averages, got {matrix.shape[0]}.")
    bad = ~np.isfinite(matrix)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ParameterError(
            f"the CC matrix has {int(bad.sum())} NaN/inf entries (rows {rows[:5].tolist()}...): some pairs "
            "of averages share too few measured samples. Lower min_overlap, or leave those averages out."
        )
    return matrix


def _components(n_components: int, n_averages: int) -> int:
    if int(n_components) != n_components or not 1 <= int(n_components) <= n_averages:
        raise ParameterError(f"n_components must be an integer in [1, {n_averages}], got {n_components!r}.")
    return int(n_components)


def clpca(cc: Any, n_components: int = 3) -> CLPCA:
    """The CLPCA space: PCA of the rows of the common-line CC matrix.

    Parameters
    ----------
    cc : array_like or dask.array.Array, shape (M, M)
        The CC matrix of `cc_matrix` (a lazy one is computed here).
    n_components : int
        Dimensions kept.

    Returns
    -------
    CLPCA
        Exact (full SVD) and with scikit-learn's deterministic signs.

    Raises
    ------
    ParameterError
        For a non-square matrix, NaN entries or a bad ``n_components``.
    """
    from sklearn.decomposition import PCA

    matrix = _in_memory(cc)
    k = _components(n_components, matrix.shape[0])
    pca = PCA(n_components=k, svd_solver="full").fit(matrix)
    return CLPCA(
        coordinates=pca.transform(matrix),
        components=pca.components_,
        mean=pca.mean_,
        explained_variance_ratio=pca.explained_variance_ratio_,
    )


def embed(cc: Any, method: str = "pca", n_components: int = 3, seed: int = 0, **options: Any) -> np.ndarray:
    """Embed the averages from the rows of their CC matrix (Appendix A of the paper).

    Parameters
    ----------
    cc : array_like or dask.array.Array, shape (M, M)
        The CC matrix (a lazy one is computed here).
    method : {"pca", "isomap", "spectral", "tsne"}
        scikit-learn's PCA, Isomap, SpectralEmbedding or TSNE, each on the CC rows.
    n_components : int
        Dimensions of the embedding.
    seed : int
        Random state of the stochastic methods (spectral, t-SNE).
    **options
        Passed to the scikit-learn estimator (e.g. ``n_neighbors``, ``perplexity``); the
        defaults are scikit-learn's, with the perplexity and neighbour counts capped for
        small M.

    Returns
    -------
    ndarray, shape (M, n_components)
    """
    if method not in EMBEDDINGS:
        raise ParameterError(f"method must be one of {EMBEDDINGS}, got {method!r}.")
    if method == "pca":
        return clpca(cc, n_components).coordinates
    from sklearn.manifold import TSNE, Isomap, SpectralEmbedding

    matrix = _in_memory(cc)
    m = matrix.shape[0]
    k = _components(n_components, m)
    neighbours = min(options.pop("n_neighbors", 10), m - 1)
    if method == "isomap":
        model = Isomap(n_components=k, n_neighbors=neighbours, **options)
    elif method == "spectral":
        model = SpectralEmbedding(n_components=k, n_neighbors=neighbours, random_state=seed, **options)
    else:
        perplexity = min(options.pop("perplexity", 30.0), (m - 1) / 3)
        model = TSNE(n_components=k, perplexity=perplexity, random_state=seed, init="pca", **options)
    return model.fit_transform(matrix)

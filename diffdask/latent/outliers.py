"""Single-hit sorting: outlier flags from a robust elliptic envelope of the latent space.

After Ramalingam, Yoon & Poitevin (2020): frames inside a minimum-covariance-determinant
Gaussian fit (`sklearn.covariance.EllipticEnvelope`) of the latent coordinates are single
hits. The log of the distance from the PCA subspace joins the coordinates by default: multiple
hits sit inside the cloud of single hits in the leading components but far from the subspace.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from diffdask.blocks import map_frames
from diffdask.checks import check_choice
from diffdask.errors import ParameterError
from diffdask.latent.kernels import Envelope, score_kernel
from diffdask.latent.model import LatentModel
from diffdask.latent.pca import fit_latent, transform

OUTLIER_METHODS = ("elliptic_envelope",)


def check_contamination(contamination: Any) -> float:
    """A contamination (expected fraction of outliers) in (0, 0.5]."""
    try:
        c = float(contamination)
    except (TypeError, ValueError):
        raise ParameterError(f"contamination must be a number in (0, 0.5], got {contamination!r}.") from None
    if not (0.0 < c <= 0.5):
        raise ParameterError(
            f"contamination must be in (0, 0.5] (the expected fraction of frames that are not single hits), "
            f"got {contamination!r}; e.g. 0.01 for a 99:1 mixture."
        )
    return c


def _feature_matrix(latent: Any, residual: Any) -> da.Array:
    z = latent.data if isinstance(latent, xr.DataArray) else latent
    z = z if isinstance(z, da.Array) else np.asarray(z)
    if z.ndim != 2:
        raise ParameterError(f"latent must be 2-D (frame, component), got shape {z.shape}.")
    if not isinstance(z, da.Array):
        z = da.from_array(z, chunks=(max(1, len(z)), -1))
    if residual is None:
        return z.astype(np.float64)
    r = residual.data if isinstance(residual, xr.DataArray) else residual
    r = r if isinstance(r, da.Array) else da.from_array(np.asarray(r), chunks=-1)
    if r.shape != (z.shape[0],):
        raise ParameterError(f"residual must have one value per frame ({z.shape[0]}), got shape {r.shape}.")
    r = r.rechunk((z.chunks[0],))
    # The residual spans decades (single hits near 0, multiple hits far above): its log is
    # close to Gaussian, which is what the envelope assumes.
    logr = da.log(da.maximum(r.astype(np.float64), np.finfo(np.float64).tiny))
    return da.concatenate([z.astype(np.float64), logr[:, None]], axis=1).rechunk({1: -1})


def flag_outliers(
    latent: Any,
    contamination: float | None = None,
    *,
    residual: Any = None,
    expected_single_fraction: float | None = None,
    method: str = "elliptic_envelope",
    max_fit_frames: int = 50_000,
    seed: int = 0,
) -> xr.Dataset:
    """Flag single hits: frames inside a robust elliptic envelope of the latent space.

    The envelope (`sklearn.covariance.EllipticEnvelope`, a minimum-covariance-determinant
    Gaussian fit) is fitted on at most ``max_fit_frames`` frames drawn with ``seed`` (the fit
    computes their latent coordinates now); every frame is then scored lazily by its squared
    Mahalanobis distance to it.

    Parameters
    ----------
    latent : xarray.DataArray or array, shape (frame, component)
        Latent coordinates (``transform(ds, model).latent``).
    contamination : float, optional
        Expected fraction of frames that are not single hits, in (0, 0.5]. Default:
        ``1 − expected_single_fraction`` when given, else 0.1 (the poster's value, which at a
        99:1 mixture throws away ≈ 9 % of the single hits: set it from the expected mixture).
    residual : xarray.DataArray or array, shape (frame,), optional
        Distance from the PCA subspace (``transform(ds, model).residual``). Its log joins the
        latent coordinates as one more dimension of the envelope: multiple hits stand out there
        when they do not in the leading components.
    expected_single_fraction : float, optional
        Expected fraction of single hits in (0.5, 1): sets the default ``contamination``.
    method : {"elliptic_envelope"}
        Outlier detector.
    max_fit_frames : int
        Frames the envelope is fitted on (the fit is O(n) but with a large constant).
    seed : int
        Seed of the fit's frame sample and of the MCD's random starts.

    Returns
    -------
    xarray.Dataset
        ``single_hit`` (frame) bool, True inside the envelope; ``outlier_score`` (frame):
        squared Mahalanobis distance (larger = less like a single hit; ``−outlier_score``
        ranks single hits first, e.g. for ROC curves). Attrs: ``contamination``,
        ``threshold`` (the score that separates them), ``features``.

    Raises
    ------
    ParameterError
        Contamination outside (0, 0.5], unknown method, fewer frames than dimensions + 2.
    """
    from sklearn.covariance import EllipticEnvelope

    check_choice("method", method, OUTLIER_METHODS)
    if contamination is None:
        if expected_single_fraction is not None:
            f = float(expected_single_fraction)
            if not (0.5 <= f < 1.0):
                raise ParameterError(
                    f"expected_single_fraction must be in [0.5, 1), got {expected_single_fraction!r}."
                )
            contamination = 1.0 - f
        else:
            contamination = 0.1
    c = check_contamination(contamination)
    if isinstance(max_fit_frames, bool) or int(max_fit_frames) < 2:
        raise ParameterError(f"max_fit_frames must be an integer ≥ 2, got {max_fit_frames!r}.")
    x = _feature_matrix(latent, residual)
    n, dim = x.shape
    if n < dim + 2:
        raise ParameterError(f"an envelope in {dim} dimensions needs at least {dim + 2} frames, got {n}.")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(n, size=min(n, int(max_fit_frames)), replace=False))
    sample = np.asarray(x[pick].compute() if n > max_fit_frames else x.compute())
    if not np.all(np.isfinite(sample)):
        raise ParameterError("latent coordinates hold NaN or inf; recompute them from finite frames.")
    env = EllipticEnvelope(contamination=c, random_state=seed).fit(sample)
    # sklearn: inlier ⇔ −d² − offset_ ≥ 0, i.e. d² ≤ −offset_.
    envelope = Envelope(np.asarray(env.location_), np.asarray(env.precision_), float(-env.offset_))
    out = map_frames(
        score_kernel,
        x,
        {"outlier_score": ((), np.float64), "single_hit": ((), bool)},
        kwargs={"envelope": envelope},
        name="latent-outliers",
    )
    attrs = {
        "method": method,
        "contamination": c,
        "threshold": envelope.threshold,
        "features": "latent + log(residual)" if residual is not None else "latent",
        "fit_frames": int(len(pick)),
        "seed": int(seed),
    }
    return xr.Dataset(
        {
            "single_hit": (("frame",), out["single_hit"]),
            "outlier_score": (("frame",), out["outlier_score"], {"units": "squared Mahalanobis distance"}),
        },
        attrs=attrs,
    )


def sort_single_hits(
    ds: xr.Dataset,
    n_components: int = 3,
    contamination: float | None = None,
    *,
    use_residual: bool = True,
    expected_single_fraction: float | None = None,
    seed: int = 0,
    **fit_options: Any,
) -> tuple[LatentModel, xr.Dataset]:
    """Fit a latent space, project the frames and flag single hits, in one call.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack.
    n_components : int
        Latent dimension.
    contamination, expected_single_fraction, seed
        As in `flag_outliers`. When both are None and ``ds.attrs["simulation"]`` records a
        ``single_hit_fraction`` (a simulated stack) that sets the default.
    use_residual : bool
        Fit the envelope on latent + log(residual) (default) or the latent coordinates alone
        (the poster's method).
    **fit_options
        Passed to `fit_latent` (method, crop, downsample, factor, normalize, intensity...).

    Returns
    -------
    model : LatentModel
    results : xarray.Dataset
        ``latent``, ``residual``, ``single_hit``, ``outlier_score`` on ``frame`` (lazy except
        for the fits) and the model's arrays (``components``, ``mean``, ...), attrs recording
        every parameter: stored with ``save_results`` it is one group from which
        `LatentModel.from_dataset` rebuilds the model.
    """
    if contamination is None and expected_single_fraction is None:
        sim = ds.attrs.get("simulation")
        frac = sim.get("single_hit_fraction") if isinstance(sim, Mapping) else None
        if frac is not None and 0.5 <= float(frac) < 1.0:
            expected_single_fraction = float(frac)
    model = fit_latent(ds, n_components, seed=seed, **fit_options)
    z = transform(ds, model)
    flags = flag_outliers(
        z["latent"],
        contamination,
        residual=z["residual"] if use_residual else None,
        expected_single_fraction=expected_single_fraction,
        seed=seed,
    )
    results = xr.merge([z, flags, model.to_dataset()], combine_attrs="drop")
    results.attrs = {
        **z.attrs,
        "outliers": dict(flags.attrs),
        "latent_model": model.to_dataset().attrs["latent_model"],
    }
    return model, results

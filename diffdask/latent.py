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
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from diffdask.backend import array_namespace, to_cpu
from diffdask.blocks import map_frames, reduce_frames
from diffdask.errors import ParameterError, SchemaError
from diffdask.frames import frames_per_chunk, get_geometry, get_mask, validate

DOWNSAMPLING = ("none", "bin", "fourier")
INTENSITY = ("none", "sqrt", "log")
METHODS = ("incremental", "randomized")
OUTLIER_METHODS = ("elliptic_envelope",)
#: A downsampled pixel (feature) is used when at least this fraction of its footprint is good
#: detector pixels; below it the feature would be an extrapolation from a few pixels.
MIN_COVERAGE = 0.5
#: Attribute that marks a dataset as a stored latent model (and its format version).
MODEL_FORMAT = 1


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How frames become feature vectors before PCA.

    Parameters
    ----------
    crop : int or None
        Side, pixels, of the square kept around the beam centre (``None``: the whole frame).
        Photon-limited frames hold their photons at low q; cropping drops noise-only pixels
        and shrinks the PCA.
    downsample : {"none", "bin", "fourier"}
        ``"bin"`` averages the good pixels of ``factor`` × ``factor`` bins; ``"fourier"``
        keeps the central 1/``factor`` of the spatial frequencies (a sinc low-pass, no
        aliasing of the fringes). Masked pixels are handled by normalised convolution:
        low-pass(I·mask) / low-pass(mask).
    factor : int
        Downsampling factor (≥ 1) per axis.
    normalize : bool
        Divide each frame's features by their mean (total photons / features), removing the
        shot-to-shot fluence. A frame without photons then cannot be used and raises.
    intensity : {"none", "sqrt", "log"}
        Applied after normalisation: ``sqrt`` (Anscombe-like variance stabilisation of
        Poisson counts), ``log`` (log1p, emphasises weak high-q fringes) or none.
    """

    crop: int | None = None
    downsample: str = "none"
    factor: int = 1
    normalize: bool = True
    intensity: str = "none"

    def __post_init__(self) -> None:
        if self.crop is not None:
            if isinstance(self.crop, bool) or int(self.crop) != self.crop or self.crop < 2:
                raise ParameterError(f"crop must be None or an integer side ≥ 2 pixels, got {self.crop!r}.")
            object.__setattr__(self, "crop", int(self.crop))
        if self.downsample not in DOWNSAMPLING:
            raise ParameterError(f"downsample must be one of {DOWNSAMPLING}, got {self.downsample!r}.")
        if isinstance(self.factor, bool) or int(self.factor) != self.factor or self.factor < 1:
            raise ParameterError(f"factor must be an integer ≥ 1, got {self.factor!r}.")
        object.__setattr__(self, "factor", int(self.factor))
        if self.downsample == "none" and self.factor != 1:
            raise ParameterError(f"factor={self.factor} needs downsample='bin' or 'fourier'.")
        if self.intensity not in INTENSITY:
            raise ParameterError(f"intensity must be one of {INTENSITY}, got {self.intensity!r}.")
        object.__setattr__(self, "normalize", bool(self.normalize))


@dataclass(frozen=True)
class FeatureLayout:
    """Where a frame's features come from (derived once from the mask and `Preprocessing`)."""

    frame_shape: tuple[int, int]
    box: tuple[int, int, int, int]  # (y0, y1, x0, x1) of the crop, pixels
    feature_shape: tuple[int, int]
    feature_mask: np.ndarray = field(compare=False)  # (fy, fx) bool: features in use
    coverage: np.ndarray = field(compare=False)  # (fy, fx) low-pass of the mask

    @property
    def n_features(self) -> int:
        """Length of a feature vector."""
        return int(self.feature_mask.sum())


def _crop_box(shape: tuple[int, int], center_yx: tuple[float, float], crop: int | None) -> tuple[int, int, int, int]:
    ny, nx = shape
    if crop is None:
        return 0, ny, 0, nx
    if crop > ny or crop > nx:
        raise ParameterError(f"crop={crop} is larger than the {ny}×{nx} frames; choose crop ≤ {min(ny, nx)}.")
    # Centre the box on the beam, then slide it inside the frame (an off-centre beam keeps the
    # requested size rather than a smaller, asymmetric box).
    y0 = min(max(int(round(center_yx[0] - (crop - 1) / 2)), 0), ny - crop)
    x0 = min(max(int(round(center_yx[1] - (crop - 1) / 2)), 0), nx - crop)
    return y0, y0 + crop, x0, x0 + crop


def _bin(block: Any, factor: int) -> Any:
    n, ny, nx = block.shape
    fy, fx = ny // factor, nx // factor
    b = block[:, : fy * factor, : fx * factor].reshape(n, fy, factor, fx, factor)
    return b.mean(axis=(2, 4))


def _fourier_crop(block: Any, factor: int) -> Any:
    """Low-pass by keeping the central 1/factor of the frequencies; same mean level."""
    xp = array_namespace(block)
    n, ny, nx = block.shape
    fy, fx = ny // factor, nx // factor
    spec = xp.fft.fftshift(xp.fft.fft2(block), axes=(1, 2))
    y0, x0 = ny // 2 - fy // 2, nx // 2 - fx // 2
    small = xp.fft.ifftshift(spec[:, y0 : y0 + fy, x0 : x0 + fx], axes=(1, 2))
    return xp.fft.ifft2(small).real * (fy * fx / (ny * nx))


def _lowpass(block: Any, prep: Preprocessing) -> Any:
    if prep.downsample == "bin":
        return _bin(block, prep.factor)
    if prep.downsample == "fourier":
        return _fourier_crop(block, prep.factor)
    return block


def feature_layout(mask: np.ndarray, prep: Preprocessing, center_yx: tuple[float, float] | None = None) -> FeatureLayout:
    """The features that `preprocess_block` makes from frames of this detector.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
        Good detector pixels.
    prep : Preprocessing
        Crop and downsampling settings.
    center_yx : (float, float), optional
        Beam centre, pixels (default: the frame centre).

    Returns
    -------
    FeatureLayout

    Raises
    ------
    ParameterError
        If the crop does not fit, the factor leaves no pixel, or no feature has enough good
        pixels.
    """
    mask = np.asarray(mask, dtype=bool)
    shape = (int(mask.shape[0]), int(mask.shape[1]))
    center = center_yx if center_yx is not None else ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    box = _crop_box(shape, center, prep.crop)
    y0, y1, x0, x1 = box
    if (y1 - y0) // prep.factor < 1 or (x1 - x0) // prep.factor < 1:
        raise ParameterError(
            f"factor={prep.factor} leaves no pixel of the {y1 - y0}×{x1 - x0} (cropped) frames; use a smaller factor."
        )
    coverage = _lowpass(mask[None, y0:y1, x0:x1].astype(np.float64), prep)[0]
    feature_mask = coverage >= MIN_COVERAGE
    if not feature_mask.any():
        raise ParameterError(
            "no feature has enough good pixels: the mask hides the cropped region; check the mask or the crop."
        )
    return FeatureLayout(shape, box, (int(coverage.shape[0]), int(coverage.shape[1])), feature_mask, coverage)


def preprocess_block(
    block: Any,
    *,
    prep: Preprocessing,
    layout: FeatureLayout,
    mask: Any,
    frame_offset: int = 0,
) -> Any:
    """Feature vectors of a block of frames (a kernel).

    Parameters
    ----------
    block : array, shape (n, ny, nx)
        Frames, photons (NumPy or CuPy).
    prep : Preprocessing
        Settings.
    layout : FeatureLayout
        From `feature_layout` for this detector and ``prep``.
    mask : array of bool, shape (ny, nx)
        Good pixels.
    frame_offset : int
        Index of the block's first frame in the stack (for error messages).

    Returns
    -------
    array, shape (n, n_features), float32
        Normalised, transformed features of the good downsampled pixels.

    Raises
    ------
    ParameterError
        If ``prep.normalize`` and a frame holds no photons in the used pixels.
    """
    xp = array_namespace(block)
    y0, y1, x0, x1 = layout.box
    values = xp.asarray(block[:, y0:y1, x0:x1], dtype=xp.float64)
    good = xp.asarray(mask, dtype=bool)[y0:y1, x0:x1]
    # NaN/inf pixels count as masked (diffdask's rule); masked pixels must not leak into the
    # low-pass, so zero them and divide by the low-passed mask (normalised convolution).
    finite = xp.isfinite(values)
    values = xp.where(finite & good, values, 0.0)
    if bool(xp.all(finite)):
        coverage = xp.asarray(layout.coverage)[None]
    else:
        coverage = _lowpass((finite & good).astype(xp.float64), prep)
    low = _lowpass(values, prep)
    fmask = xp.asarray(layout.feature_mask)
    features = low[:, fmask] / xp.maximum(coverage[:, fmask], MIN_COVERAGE)
    if prep.normalize:
        mean = features.mean(axis=1)
        empty = ~(mean > 0)
        if bool(xp.any(empty)):
            bad = [int(i) + frame_offset for i in np.flatnonzero(to_cpu(empty))[:5]]
            raise ParameterError(
                f"frames {bad} hold no photons in the pixels used for the latent space, so they cannot be "
                "normalised; keep hits only (diffdask.find_hits, then ds.isel(frame=...)) or pass normalize=False."
            )
        features = features / mean[:, None]
    if prep.intensity == "sqrt":
        # Negative values (dark-subtracted noise) are clipped: sqrt/log are for photon counts.
        features = xp.sqrt(xp.maximum(features, 0.0))
    elif prep.intensity == "log":
        features = xp.log1p(xp.maximum(features, 0.0))
    return features.astype(xp.float32)


def _features_kernel(block: Any, *, frame_offset: int, **kwargs: Any) -> dict[str, Any]:
    return {"features": to_cpu(preprocess_block(block, frame_offset=frame_offset, **kwargs))}


def _moments_kernel(features: np.ndarray) -> dict[str, Any]:
    x = features.astype(np.float64)
    return {"sum": x.sum(axis=0), "sumsq": (x * x).sum(axis=0), "count": np.int64(x.shape[0])}


def _frames(ds: xr.Dataset) -> da.Array:
    """The frames as a Dask array (in-memory stacks get chunks of `frames_per_chunk`)."""
    data = ds["frames"].data
    if isinstance(data, da.Array):
        return data
    return da.from_array(data, chunks=(frames_per_chunk(data.shape[1:], data.dtype), -1, -1))


def _layout_of(ds: xr.Dataset, prep: Preprocessing) -> FeatureLayout:
    geometry = get_geometry(ds)
    center = tuple(geometry.beam_center_yx) if geometry is not None else None
    return feature_layout(get_mask(ds), prep, center)


def latent_features(ds: xr.Dataset, prep: Preprocessing | None = None) -> xr.DataArray:
    """Lazy feature vectors (frame, feature) of a frame stack, as the PCA sees them.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack.
    prep : Preprocessing, optional
        Settings (default `Preprocessing()`).

    Returns
    -------
    xarray.DataArray, dims (frame, feature), float32
    """
    ds = validate(ds)
    prep = prep or Preprocessing()
    layout = _layout_of(ds, prep)
    out = map_frames(
        _features_kernel,
        _frames(ds),
        {"features": ((layout.n_features,), np.float32)},
        kwargs={"prep": prep, "layout": layout, "mask": get_mask(ds)},
        name="latent-features",
        pass_offset=True,
    )
    return xr.DataArray(out["features"], dims=("frame", "feature"), name="features")


# --------------------------------------------------------------------------- model
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
        from diffdask.errors import StoreExistsError
        from diffdask.io.location import Location

        loc = Location.of(path, None)
        if loc.exists() and not overwrite:
            raise StoreExistsError(f"{loc.url!r} exists; pass overwrite=True to replace it.")
        self.to_dataset().to_zarr(loc.url, mode="w", zarr_format=3, consolidated=False)

    @classmethod
    def load(cls, path: Any) -> LatentModel:
        """Read a model written by `save` (or a ``results/latent`` group of a store)."""
        from diffdask.errors import StoreFormatError
        from diffdask.io.location import Location

        loc = Location.of(path, None)
        loc.require()
        try:
            ds = xr.open_zarr(loc.url, zarr_format=3, consolidated=False)
        except Exception as exc:  # zarr raises several kinds for "not a group"
            raise StoreFormatError(f"{loc.url!r} is not a Zarr group holding a latent model: {exc}") from None
        return cls.from_dataset(ds.load())


def _fix_signs(components: np.ndarray) -> np.ndarray:
    # The sign of a principal axis is arbitrary; fix it (largest |loading| positive, sklearn's
    # convention) so that models fitted twice, or by both methods, read the same way.
    idx = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(components.shape[0]), idx])
    signs[signs == 0] = 1
    return components * signs[:, None]


def _stream_blocks(arr: da.Array, window: int) -> Iterator[np.ndarray]:
    """Yield the chunks of ``arr`` in order, computing at most ``window`` ahead.

    The next chunks are computed (on the workers of a distributed client, else by the local
    scheduler in a background thread) while the caller works on the current ones.
    """
    blocks = list(arr.to_delayed().ravel())
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        client = None
    if client is not None:
        pending: deque[Any] = deque(client.compute(b) for b in blocks[:window])
        for nxt in blocks[window:] + [None] * len(pending):
            fut = pending.popleft()
            if nxt is not None:
                pending.append(client.compute(nxt))
            yield np.asarray(fut.result())
            fut.release()
        return
    groups = [blocks[i : i + window] for i in range(0, len(blocks), window)]
    with ThreadPoolExecutor(1) as pool:
        pending_group = pool.submit(dask.compute, *groups[0])
        for nxt in groups[1:] + [None]:
            done = pending_group.result()
            if nxt is not None:
                pending_group = pool.submit(dask.compute, *nxt)
            yield from (np.asarray(b) for b in done)


def _check_components(n_components: Any, n_frames: int, n_features: int) -> int:
    if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
        raise ParameterError(f"n_components must be an integer ≥ 1, got {n_components!r}.")
    k = int(n_components)
    if k > n_features:
        raise ParameterError(
            f"n_components={k} is larger than the {n_features} pixels (features) left after masking, cropping "
            "and downsampling; use fewer components or less downsampling."
        )
    if k > n_frames:
        raise ParameterError(f"n_components={k} is larger than the number of frames ({n_frames}).")
    return k


def fit_latent(
    ds: xr.Dataset,
    n_components: int = 3,
    method: str = "incremental",
    *,
    crop: int | None = None,
    downsample: str = "none",
    factor: int = 1,
    normalize: bool = True,
    intensity: str = "none",
    batch_frames: int = 256,
    window: int | None = None,
    n_power_iter: int = 2,
    oversampling: int = 10,
    seed: int = 0,
) -> LatentModel:
    """Fit a latent space (PCA) to a frame stack.

    This computes (a fit is not lazy): ``incremental`` streams the preprocessed chunks from the
    workers to this process in frame order and feeds `IncrementalPCA.partial_fit` with batches
    of exactly ``batch_frames`` frames (the last one up to ``batch_frames + n_components − 1``),
    so memory is constant in the number of frames and the model does not depend on the Dask
    chunking; ``randomized`` computes the feature mean and total variance in one reduction and
    the leading singular vectors with `dask.array.linalg.svd_compressed` on the workers (each
    power iteration re-reads the frames: persist ``ds`` first if it fits in cluster memory).

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack (photons). Frames without photons in the used pixels raise when read.
    n_components : int
        Dimension of the latent space (≤ number of features and of frames).
    method : {"incremental", "randomized"}
        Fit algorithm, see above.
    crop, downsample, factor, normalize, intensity
        Preprocessing, see `Preprocessing`.
    batch_frames : int
        Frames per `partial_fit` call (incremental); ≥ ``n_components``. IPCA keeps only
        ``n_components`` axes between batches, so small batches lose variance along nearly
        degenerate axes (orientation components of single hits: −9 % at 64 frames, −1 % at
        256 against the exact PCA); larger batches cost O(batch × features) per frame.
    window : int, optional
        Chunks computed ahead of `partial_fit` (incremental); default: 2 per Dask worker
        thread, at least 2.
    n_power_iter, oversampling : int
        Accuracy of the randomized SVD (power iterations, extra random vectors).
    seed : int
        Seed of the randomized SVD's test matrix.

    Returns
    -------
    LatentModel

    Raises
    ------
    ParameterError
        Unknown method, bad preprocessing, ``n_components`` larger than the pixel (feature)
        count or the frame count, frames without photons.
    """
    ds = validate(ds)
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS}, got {method!r}.")
    prep = Preprocessing(crop=crop, downsample=downsample, factor=factor, normalize=normalize, intensity=intensity)
    layout = _layout_of(ds, prep)
    n_frames = int(ds.sizes["frame"])
    k = _check_components(n_components, n_frames, layout.n_features)
    features = latent_features(ds, prep).data
    if method == "incremental":
        if isinstance(batch_frames, bool) or int(batch_frames) < k:
            raise ParameterError(f"batch_frames must be an integer ≥ n_components ({k}), got {batch_frames!r}.")
        components, mean, var, ratio = _fit_incremental(features, k, int(batch_frames), _window(window))
    else:
        components, mean, var, ratio = _fit_randomized(features, k, int(n_power_iter), int(oversampling), seed)
    return LatentModel(
        components=components,
        mean=mean,
        explained_variance=var,
        explained_variance_ratio=ratio,
        n_frames=n_frames,
        method=method,
        prep=prep,
        layout=layout,
    )


def _window(window: int | None) -> int:
    if window is not None:
        if isinstance(window, bool) or int(window) < 1:
            raise ParameterError(f"window must be an integer ≥ 1, got {window!r}.")
        return int(window)
    try:
        from distributed import default_client

        threads = sum(default_client().nthreads().values())
    except (ImportError, ValueError):
        threads = dask.config.get("num_workers", None) or 2
    return max(2, 2 * int(threads))


def _fit_incremental(
    features: da.Array, k: int, batch: int, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.decomposition import IncrementalPCA

    ipca = IncrementalPCA(n_components=k)
    buf: list[np.ndarray] = []
    n_buf = 0
    for block in _stream_blocks(features, window):
        buf.append(block)
        n_buf += block.shape[0]
        # Fit rows [0, B), [B, 2B), ... whatever the chunking; keep ≥ k rows back so that the
        # last partial_fit has the ≥ n_components rows it needs.
        while n_buf >= batch + k:
            rows = np.concatenate(buf)
            ipca.partial_fit(rows[:batch])
            buf, n_buf = [rows[batch:]], n_buf - batch
    ipca.partial_fit(np.concatenate(buf))
    return (
        _fix_signs(ipca.components_.astype(np.float64)),
        ipca.mean_.astype(np.float64),
        ipca.explained_variance_.astype(np.float64),
        ipca.explained_variance_ratio_.astype(np.float64),
    )


def _fit_randomized(
    features: da.Array, k: int, n_power_iter: int, oversampling: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = features.shape[1]
    moments = reduce_frames(
        _moments_kernel,
        features,
        {"sum": ((d,), np.float64), "sumsq": ((d,), np.float64), "count": ((), np.int64)},
        name="latent-moments",
    )
    s1, s2, n = dask.compute(moments["sum"], moments["sumsq"], moments["count"])
    n = int(n)
    mean = s1 / n
    total_var = float((s2 - n * mean * mean).sum() / max(1, n - 1))
    # float64: power iterations amplify float32 rounding along weak components.
    centered = features.astype(np.float64) - mean
    _, s, v = da.linalg.svd_compressed(
        centered, k, n_power_iter=n_power_iter, n_oversamples=oversampling, seed=seed, compute=False
    )
    s, v = dask.compute(s, v)
    var = s.astype(np.float64) ** 2 / max(1, n - 1)
    return _fix_signs(np.asarray(v, dtype=np.float64)), mean, var, var / total_var


# --------------------------------------------------------------------------- transform
def _project_kernel(block: Any, *, frame_offset: int, mean: Any, components: Any, **kwargs: Any) -> dict[str, Any]:
    # The projection is a small matrix product: done on the CPU whatever the block's device.
    x = to_cpu(preprocess_block(block, frame_offset=frame_offset, **kwargs)).astype(np.float64) - mean
    z = x @ components.T
    # Squared distance from the PCA subspace (the components are orthonormal), per feature.
    residual = np.maximum((x * x).sum(axis=1) - (z * z).sum(axis=1), 0.0) / x.shape[1]
    return {"latent": z, "residual": residual}


def transform(ds: xr.Dataset, model: LatentModel) -> xr.Dataset:
    """Latent coordinates of every frame, lazily (one kernel per chunk).

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack of the detector the model was fitted on.
    model : LatentModel
        From `fit_latent` or `LatentModel.load`.

    Returns
    -------
    xarray.Dataset
        ``latent`` (frame, component): coordinates along the principal axes (feature units);
        ``residual`` (frame): mean squared distance per feature from the PCA subspace (how
        badly the latent space describes the frame; large for patterns unlike the bulk).
        Join them to the stack with ``ds.assign(...)`` or store them with ``save_results``.

    Raises
    ------
    SchemaError
        If the frames are not the shape the model was fitted on.
    """
    ds = validate(ds)
    if not isinstance(model, LatentModel):
        raise ParameterError(f"model must be a LatentModel (from fit_latent or LatentModel.load), got {type(model).__name__}.")
    shape = tuple(int(s) for s in ds["frames"].shape[1:])
    if shape != tuple(model.layout.frame_shape):
        raise SchemaError(f"the model was fitted on {model.layout.frame_shape} frames, these are {shape}.")
    k = model.n_components
    out = map_frames(
        _project_kernel,
        _frames(ds),
        {"latent": ((k,), np.float64), "residual": ((), np.float64)},
        kwargs={
            "prep": model.prep,
            "layout": model.layout,
            "mask": get_mask(ds),
            "mean": model.mean,
            "components": model.components,
        },
        name="latent-transform",
        pass_offset=True,
    )
    attrs = {
        "latent_method": model.method,
        "n_components": k,
        "explained_variance_ratio": [float(v) for v in model.explained_variance_ratio],
        "preprocessing": asdict(model.prep),
    }
    return xr.Dataset(
        {
            "latent": (("frame", "component"), out["latent"], {"units": "feature units"}),
            "residual": (("frame",), out["residual"], {"units": "feature units² per feature"}),
        },
        attrs=attrs,
    )


# --------------------------------------------------------------------------- outliers
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


@dataclass(frozen=True)
class _Envelope:
    """The fitted robust Gaussian, as plain arrays (what the scoring kernel needs)."""

    location: np.ndarray
    precision: np.ndarray
    threshold: float


def _score_kernel(block: Any, *, envelope: _Envelope) -> dict[str, Any]:
    d = np.asarray(block, dtype=np.float64) - envelope.location
    score = np.einsum("ij,jk,ik->i", d, envelope.precision, d)
    return {"outlier_score": score, "single_hit": score <= envelope.threshold}


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

    if method not in OUTLIER_METHODS:
        raise ParameterError(f"method must be one of {OUTLIER_METHODS}, got {method!r}.")
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
    envelope = _Envelope(np.asarray(env.location_), np.asarray(env.precision_), float(-env.offset_))
    out = map_frames(
        _score_kernel,
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


def explained_variance_summary(model: LatentModel) -> str:
    """One line: the explained-variance ratio of each component, in percent."""
    parts = ", ".join(f"{100 * v:.2f} %" for v in model.explained_variance_ratio)
    total = 100 * float(np.sum(model.explained_variance_ratio))
    return f"{model.n_components} components ({model.method}): {parts} (total {total:.2f} %)"


__all__ = [
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

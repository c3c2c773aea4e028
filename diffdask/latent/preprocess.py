"""Frames to feature vectors: crop around the beam, low-pass downsampling, normalisation.

Kernels on blocks of frames (NumPy or CuPy). Masked pixels are handled by normalised
convolution, low-pass(I·mask) / low-pass(mask), so they never leak into a feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffdask.backend import array_namespace, to_cpu
from diffdask.checks import check_choice
from diffdask.errors import ParameterError

DOWNSAMPLING = ("none", "bin", "fourier")
INTENSITY = ("none", "sqrt", "log")
#: A downsampled pixel (feature) is used when at least this fraction of its footprint is good
#: detector pixels; below it the feature would be an extrapolation from a few pixels.
MIN_COVERAGE = 0.5


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
        check_choice("downsample", self.downsample, DOWNSAMPLING)
        if isinstance(self.factor, bool) or int(self.factor) != self.factor or self.factor < 1:
            raise ParameterError(f"factor must be an integer ≥ 1, got {self.factor!r}.")
        object.__setattr__(self, "factor", int(self.factor))
        if self.downsample == "none" and self.factor != 1:
            raise ParameterError(f"factor={self.factor} needs downsample='bin' or 'fourier'.")
        check_choice("intensity", self.intensity, INTENSITY)
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

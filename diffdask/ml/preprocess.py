"""Preprocessing of frame blocks for neural networks: crop around the beam, intensity scaling."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diffdask.errors import ParameterError
from diffdask.frames import clean_block

_SCALES = ("none", "log1p", "sqrt")
_NORMS = ("none", "total", "max")


@dataclass(frozen=True)
class Preprocess:
    """How frames become network inputs.

    Attributes
    ----------
    crop : tuple of int or None
        ``(height, width)`` patch centred on the beam (pixels outside the frame are 0), or None
        for the whole frame.
    scale : {"none", "log1p", "sqrt"}
        Intensity transform (photon-limited data: log1p or sqrt tame the bright centre).
    normalize : {"none", "total", "max"}
        Per-frame normalisation after scaling.
    """

    crop: tuple[int, int] | None = None
    scale: str = "log1p"
    normalize: str = "max"

    def __post_init__(self) -> None:
        if self.scale not in _SCALES:
            raise ParameterError(f"scale must be one of {_SCALES}, got {self.scale!r}.")
        if self.normalize not in _NORMS:
            raise ParameterError(f"normalize must be one of {_NORMS}, got {self.normalize!r}.")
        if self.crop is not None:
            crop = tuple(int(c) for c in self.crop)
            if len(crop) != 2 or min(crop) < 1:
                raise ParameterError(f"crop must be (height, width) ≥ 1, got {self.crop!r}.")
            object.__setattr__(self, "crop", crop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        d = dict(d)
        if d.get("crop") is not None:
            d["crop"] = tuple(d["crop"])
        return cls(**d)

    def apply(self, block: np.ndarray, mask: np.ndarray, center: tuple[float, float]) -> np.ndarray:
        """``(n, y, x)`` frames → float32 ``(n, 1, h, w)`` network inputs (masked pixels 0)."""
        values, _ = clean_block(np.asarray(block), mask)
        values = np.maximum(values, 0.0) if self.scale != "none" else values
        if self.crop is not None:
            values = _crop(values, self.crop, center)
        if self.scale == "log1p":
            values = np.log1p(values)
        elif self.scale == "sqrt":
            values = np.sqrt(values)
        if self.normalize != "none":
            reduce = np.sum if self.normalize == "total" else np.max
            norm = reduce(np.abs(values), axis=(1, 2), keepdims=True)
            values = np.divide(values, norm, out=np.zeros_like(values), where=norm > 0)
        return values.astype(np.float32)[:, None]


def _crop(values: np.ndarray, size: tuple[int, int], center: tuple[float, float]) -> np.ndarray:
    h, w = size
    cy, cx = (int(np.floor(c + 0.5)) for c in center)
    top, left = cy - h // 2, cx - w // 2
    out = np.zeros((values.shape[0], h, w), dtype=values.dtype)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, values.shape[1]), min(left + w, values.shape[2])
    if y1 > y0 and x1 > x0:
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = values[:, y0:y1, x0:x1]
    return out

"""The EMC view of a detector: Dragonfly-ordered pixels, plane coordinates, corr, 0/1/2 mask."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np
import xarray as xr

from diffdask.errors import GeometryError, SchemaError
from diffdask.frames import get_geometry, get_mask


@dataclass(frozen=True)
class EMCDetector:
    """Pixels of a detector as 2D EMC uses them.

    Attributes
    ----------
    pixels : ndarray of int, shape (T,)
        Flat frame indices (row·nx + column) of the detector pixels, in Dragonfly order.
    x, y : ndarray, shape (T,)
        Detector-plane coordinates relative to the beam, in pixels (x along frame rows).
    corr : ndarray, shape (T,)
        Solid angle × polarisation, as stored (EMC divides it by its mean).
    mask : ndarray of uint8, shape (T,)
        0 = used in the likelihood, 1 = merged only, 2 = bad.
    detd_px : float
        Detector distance in pixels (for writing Dragonfly files).
    """

    pixels: np.ndarray
    x: np.ndarray
    y: np.ndarray
    corr: np.ndarray
    mask: np.ndarray
    detd_px: float

    @classmethod
    def from_dataset(cls, ds: xr.Dataset, all_pixels: bool = False) -> EMCDetector:
        """The EMC detector of a frame stack.

        Stacks read by `diffdask.io.read_emc` keep Dragonfly's pixel order, coordinates,
        ``corr`` and 0/1/2 mask. Any other stack needs a `Geometry`: pixels in row-major order,
        coordinates from the beam centre, ``corr`` = solid angle × x-polarisation, mask 0 where
        ``mask`` is True and 2 elsewhere (``all_pixels=False`` drops the bad ones).

        Raises
        ------
        GeometryError
            The stack has neither Dragonfly pixel data nor a geometry.
        """
        shape = ds["frames"].shape[1:]
        if "emc_pixel" in ds.variables:
            index = np.asarray(ds["emc_pixel"].values).ravel()
            grid = np.flatnonzero(index >= 0)
            order = np.argsort(index[grid])
            pixels = grid[order]

            def take(name: str) -> np.ndarray:
                return np.asarray(ds[name].values).ravel()[pixels]

            emc_mask = take("emc_mask").astype(np.uint8)
            if not all_pixels:
                pixels = pixels[emc_mask < 2]
            return cls(pixels, take("emc_x"), take("emc_y"), take("corr"), take("emc_mask").astype(np.uint8),
                       float(ds.attrs.get("emc_detd_px", 0.0)))
        geometry = get_geometry(ds)
        if geometry is None:
            raise GeometryError(
                "EMC needs detector-plane pixel coordinates: give the frame stack a Geometry "
                "(ds.attrs.update(Geometry(...).to_attrs())) or read Dragonfly files with read_emc."
            )
        good = get_mask(ds).ravel()
        pixels = np.arange(good.size) if all_pixels else np.flatnonzero(good)
        py, px = geometry.pixel_size_yx_m
        if py != px:
            raise GeometryError("EMC models need square pixels; this geometry has non-square ones.")
        cy, cx = geometry.beam_center_yx
        rows, cols = np.divmod(pixels, shape[1])
        corr = (geometry.solid_angle_sr * geometry.polarization_factor("x")).ravel()
        return cls(
            pixels=pixels,
            x=rows - cy,
            y=cols - cx,
            corr=corr[pixels] / corr.mean(),
            mask=np.where(good[pixels], 0, 2).astype(np.uint8),
            detd_px=geometry.distance_m / py,
        )

    @property
    def model_size(self) -> int:
        """Edge S of the square models: 2⌈max radius of pixels with mask < 2⌉ + 3 (Dragonfly)."""
        used = self.mask < 2
        if not used.any():
            raise SchemaError("every detector pixel is masked (mask = 2); EMC has nothing to use.")
        return int(2 * np.ceil(np.hypot(self.x[used], self.y[used]).max()) + 3)

    def write_dragonfly(self, path: str) -> None:
        """Write a Dragonfly HDF5 detector file (q in voxel units with Ewald radius = detd)."""
        if self.detd_px <= 0:
            raise GeometryError("writing a Dragonfly detector needs the detector distance (detd) in pixels.")
        radius = self.detd_px
        length = np.sqrt(self.x**2 + self.y**2 + self.detd_px**2)
        with h5py.File(path, "w") as f:
            f["qx"] = self.x / length * radius
            f["qy"] = self.y / length * radius
            f["qz"] = (self.detd_px / length - 1.0) * radius
            f["corr"] = self.corr
            f["mask"] = self.mask.astype(np.uint8)
            f["detd"] = self.detd_px
            f["ewald_rad"] = radius

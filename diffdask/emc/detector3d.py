"""The 3D EMC view of a detector: each pixel's q-vector on the Ewald sphere, in model voxels.

Conventions are Dragonfly's (its detector file and ``make_detector.py``): q = k_out − k_in with
the beam along +z, in units of the model's voxel spacing, which is the |q| of a pixel one
pixel from the beam on a flat detector; ``qz ≤ 0``. Model axis 0 runs along the frame rows,
axis 1 along the columns and axis 2 along the beam (Dragonfly's x, y, z: `diffdask.io.read_emc`
puts its x on the rows). ``corr`` (solid angle × polarisation) is divided by its mean over all
detector pixels, as ``emc`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import h5py
import numpy as np
import xarray as xr

from diffdask.checks import check_choice, check_finite
from diffdask.errors import GeometryError, SchemaError
from diffdask.frames import get_geometry, get_mask
from diffdask.io.dragonfly import read_detector


@dataclass(frozen=True)
class Detector3D:
    """Pixels of a detector as 3D EMC uses them (those with mask < 2, in Dragonfly order).

    Attributes
    ----------
    pixels : ndarray of int, shape (T,)
        Flat frame indices (row·nx + column) of the pixels.
    q : ndarray, shape (T, 3)
        q-vectors in voxel units (model axes 0, 1, 2).
    corr : ndarray, shape (T,)
        Solid angle × polarisation divided by its mean over all detector pixels.
    mask : ndarray of uint8, shape (T,)
        0 = used in the likelihood and merged, 1 = merged only.
    detd_px : float
        Detector distance in pixels (Dragonfly's ``detd``).
    ewald_rad_vox : float
        Ewald-sphere radius in voxels (Dragonfly's ``ewald_rad``).
    voxel_inv_nm : float or None
        Voxel spacing in s = q/2π, nm⁻¹, when the stack has a `Geometry`.
    """

    pixels: np.ndarray
    q: np.ndarray
    corr: np.ndarray
    mask: np.ndarray
    detd_px: float
    ewald_rad_vox: float
    voxel_inv_nm: float | None = None

    @classmethod
    def from_dataset(
        cls, ds: xr.Dataset, polarization: str = "x", tilt_rad: tuple[float, float] = (0.0, 0.0)
    ) -> Detector3D:
        """The 3D EMC detector of a frame stack.

        Stacks read by `diffdask.io.read_emc` keep Dragonfly's q-vectors, ``corr`` and 0/1/2
        mask exactly. Any other stack needs a `Geometry`; its good pixels get mask 0.

        Parameters
        ----------
        ds : xarray.Dataset
            Frame stack.
        polarization : {"x", "y", "none"}
            Beam polarisation in the laboratory frame of `Geometry` (x along the columns).
        tilt_rad : (float, float)
            Detector pitch and yaw, radians (see `Geometry.tilt_matrix`).

        Raises
        ------
        GeometryError
            The stack has neither Dragonfly pixel data nor a geometry, or its pixels are not square.
        """
        if "emc_qx" in ds.variables:
            index = np.asarray(ds["emc_pixel"].values).ravel()
            grid = np.flatnonzero(index >= 0)
            pixels = grid[np.argsort(index[grid])]

            def take(name: str) -> np.ndarray:
                return np.asarray(ds[name].values).ravel()[pixels]

            mask = take("emc_mask").astype(np.uint8)
            corr = take("corr")
            q = np.stack([take("emc_qx"), take("emc_qy"), take("emc_qz")], axis=1)
            used = mask < 2
            return cls(pixels[used], q[used], corr[used] / corr.mean(), mask[used],
                       float(ds.attrs["emc_detd_px"]), float(ds.attrs["emc_ewald_rad_vox"]))
        geometry = get_geometry(ds)
        if geometry is None:
            raise GeometryError(
                "3D EMC needs each pixel's q-vector: give the frame stack a Geometry "
                "(ds.attrs.update(Geometry(...).to_attrs())) or read Dragonfly files with read_emc."
            )
        check_choice("polarization", polarization, ("x", "y", "none"))
        pitch, yaw = (check_finite("detector tilt", t, "rad") for t in tilt_rad)
        py, px = geometry.pixel_size_yx_m
        if not math.isclose(py, px, rel_tol=1e-9):
            raise GeometryError("3D EMC needs square pixels (one voxel spacing); this geometry has non-square ones.")
        maps = geometry.tilted_maps(pitch, yaw, polarization)
        voxel = 2.0 * math.sin(0.5 * math.atan(px / geometry.distance_m)) / (geometry.wavelength_m * 1e9)
        s = maps["scattering_vectors_inv_nm"]
        q = np.stack([s[1].ravel(), s[0].ravel(), s[2].ravel()], axis=1) / voxel
        corr = (maps["solid_angle_sr"] * maps["polarization_factor"]).ravel()
        pixels = np.flatnonzero(get_mask(ds).ravel())
        if pixels.size == 0:
            raise SchemaError("every detector pixel is masked; 3D EMC has nothing to use.")
        detd = geometry.distance_m / px
        ewald = 1.0 / (2.0 * math.sin(0.5 * math.atan(1.0 / detd)))
        return cls(pixels, q[pixels], corr[pixels] / corr.mean(), np.zeros(pixels.size, np.uint8), detd, ewald, voxel)

    @classmethod
    def from_dragonfly(cls, path: str) -> Detector3D:
        """A Dragonfly HDF5 detector file (pixels with mask 2 dropped)."""
        det = read_detector(path)
        used = det["mask"] < 2
        corr = det["corr"].astype(np.float64)
        q = np.stack([det["qx"], det["qy"], det["qz"]], axis=1).astype(np.float64)
        return cls(np.flatnonzero(used), q[used], corr[used] / corr.mean(), det["mask"][used].astype(np.uint8),
                   det["detd"], det["ewald_rad"])

    @property
    def n_pixels(self) -> int:
        return int(self.q.shape[0])

    @property
    def model_size(self) -> int:
        """Edge S of the cubic model: 2⌈max |q|⌉ + 3 voxels (Dragonfly); centre at S // 2."""
        return int(2 * math.ceil(float(np.linalg.norm(self.q, axis=1).max())) + 3)

    def check_fits(self, size: int) -> None:
        """Raise a `GeometryError` when the Ewald sphere's pixels do not fit a model of edge ``size``."""
        need = self.model_size
        if size < need:
            raise GeometryError(
                f"a 3D model of {size}³ voxels cannot hold this detector's Ewald sphere: its largest |q| "
                f"is {np.linalg.norm(self.q, axis=1).max():.2f} voxels, which needs an edge of {need}. "
                f"Use size ≥ {need}, or mask the high-q pixels."
            )

    def write_dragonfly(self, path: str) -> None:
        """Write the pixels as a Dragonfly HDF5 detector file (``qx, qy, qz, corr, mask, detd, ewald_rad``)."""
        with h5py.File(path, "w") as f:
            for i, name in enumerate(("qx", "qy", "qz")):
                f[name] = self.q[:, i]
            f["corr"] = self.corr
            f["mask"] = self.mask.astype(np.uint8)
            f["detd"] = self.detd_px
            f["ewald_rad"] = self.ewald_rad_vox

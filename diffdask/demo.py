"""Demo input for ``make demo``: a CXI file of noisy sphere patterns, written in bounded memory.

Run as ``python -m diffdask.demo OUT.cxi [--n-frames N]``.
"""

from __future__ import annotations

import argparse

import h5py
import numpy as np

from diffdask.geometry import Geometry
from diffdask.io.hdf5 import CXI_DATA, CXI_DETECTOR, CXI_SOURCE, HC_J_M


def demo_geometry(shape: tuple[int, int] = (128, 128)) -> Geometry:
    """A small SPI detector: 6 Å photons, 0.3 m distance, 600 µm pixels, beam off-centre."""
    return Geometry(shape, pixel_size_m=600e-6, distance_m=0.3, wavelength_m=6e-10,
                    beam_center_yx=(shape[0] / 2 - 0.3, shape[1] / 2 + 0.6))


def demo_mask(geometry: Geometry, beamstop_px: float = 4.0, gap_px: int = 4) -> np.ndarray:
    """Good-pixel mask with a horizontal panel gap through the middle and a round beamstop."""
    good = geometry.radius_px > beamstop_px
    mid = geometry.shape[0] // 2
    good[mid - gap_px // 2 : mid + gap_px - gap_px // 2] = False
    return good


def write_demo_cxi(
    path: str,
    n_frames: int = 2000,
    shape: tuple[int, int] = (128, 128),
    photons_per_frame: float = 2000.0,
    seed: int = 0,
    block: int = 500,
) -> None:
    """Write a CXI file of Poisson-sampled sphere diffraction patterns (diameters 55–84 nm).

    Parameters
    ----------
    path : str
        Output file.
    n_frames : int
        Number of frames.
    shape : tuple of int
        Detector shape in pixels.
    photons_per_frame : float
        Mean photons per frame (before per-shot fluence jitter, Gamma(2, 1/2)).
    seed : int
        Random seed; frame k depends on (seed, k) only.
    block : int
        Frames generated and written per step (bounds memory).
    """
    geometry = demo_geometry(shape)
    mask = demo_mask(geometry)
    q = geometry.q_inv_nm
    weight = geometry.solid_angle_sr * geometry.polarization_factor("x")
    with h5py.File(path, "w") as f:
        data = f.create_dataset(CXI_DATA, shape=(n_frames, *shape), dtype="uint16",
                                chunks=(min(16, n_frames), *shape), compression="gzip", compression_opts=1)
        f[f"{CXI_DETECTOR}/mask"] = (~mask).astype("uint16")
        f[f"{CXI_DETECTOR}/distance"] = geometry.distance_m
        f[f"{CXI_DETECTOR}/x_pixel_size"] = geometry.pixel_size_yx_m[1]
        f[f"{CXI_DETECTOR}/y_pixel_size"] = geometry.pixel_size_yx_m[0]
        f[f"{CXI_SOURCE}/energy"] = HC_J_M / geometry.wavelength_m
        cy, cx = geometry.beam_center_yx
        py, px = geometry.pixel_size_yx_m
        f[f"{CXI_DETECTOR}/corner_position"] = [-(cx + 0.5) * px, -(cy + 0.5) * py, geometry.distance_m]
        diameters = f.create_dataset("entry_1/sample_1/diameter_nm", shape=(n_frames,), dtype="float64")
        for start in range(0, n_frames, block):
            stop = min(start + block, n_frames)
            frames = np.empty((stop - start, *shape), dtype="uint16")
            d = np.empty(stop - start)
            for k in range(start, stop):
                rng = np.random.default_rng([seed, k])
                d[k - start] = rng.uniform(55.0, 84.0)
                x = np.maximum(q * d[k - start] / 2.0, 1e-6)
                form = (3.0 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
                mu = form * weight
                mu *= photons_per_frame * rng.gamma(2.0, 0.5) / mu.sum()
                frames[k - start] = rng.poisson(mu)
            data[start:stop] = frames
            diameters[start:stop] = d


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--n-frames", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_demo_cxi(args.path, n_frames=args.n_frames, seed=args.seed)
    print(f"wrote {args.n_frames} frames to {args.path}")


if __name__ == "__main__":
    _main()

"""Demo input for ``make demo``: a CXI file of simulated SPI hits, written in bounded memory.

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
    single_hit_fraction: float = 0.9,
    seed: int = 0,
    block: int = 500,
) -> None:
    """Write a CXI file of simulated SPI hits on spheres of 55–84 nm (`diffdask.simulate_spi`).

    Parameters
    ----------
    path : str
        Output file.
    n_frames : int
        Number of frames.
    shape : tuple of int
        Detector shape in pixels.
    single_hit_fraction : float
        Fraction of single hits; the rest hold 2–4 particles.
    seed : int
        Random seed; frame k depends on (seed, k) only.
    block : int
        Frames generated and written per step (bounds memory).
    """
    from diffdask.simulate import Particle, simulate_spi

    geometry = demo_geometry(shape)
    mask = demo_mask(geometry)
    ds = simulate_spi(
        n_frames,
        geometry,
        particles=[Particle("sphere", diameter_nm=(55.0, 84.0))],
        single_hit_fraction=single_hit_fraction,
        fluence_photons_per_m2=2e22,
        mask=mask,
        seed=seed,
        chunks=block,
    )
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
        labels = {name: f.create_dataset(f"entry_1/sample_1/{name}", shape=(n_frames,), dtype=dtype)
                  for name, dtype in (("diameter_nm", "float64"), ("single_hit", "bool"), ("n_particles", "uint8"))}
        for start in range(0, n_frames, block):
            stop = min(start + block, n_frames)
            part = ds.isel(frame=slice(start, stop)).compute()
            data[start:stop] = np.rint(part.frames.values).astype("uint16")
            for name, dset in labels.items():
                dset[start:stop] = part[name].values


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

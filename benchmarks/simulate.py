"""SPI simulation throughput on one core, against the cost of the Poisson draw alone.

For 128×128 single hits this measures, in one run on one thread (Dask synchronous
scheduler, BLAS pinned to one thread):

- floor: drawing the Poisson counts alone from per-frame generators, for the same expected
  photons μ the simulator produces (what any simulator of noisy frames must pay);
- slicing: rounded cubes (superellipsoid p = 6, 42 nm) through the precomputed reciprocal
  grid, with and without the Poisson draw;
- analytic: spheres of 55–84 nm through the closed-form form factor, with Poisson noise.

Frames/s and ratios against the floor are printed (ratio = path frames/s ÷ floor frames/s),
from wall-clock time and from the process's CPU time (on a machine shared with other jobs
the CPU time is the steadier measure of per-core speed). Run:
``python benchmarks/simulate.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dask  # noqa: E402
import numpy as np  # noqa: E402

import diffdask as dd  # noqa: E402
from diffdask.simulate import Particle, form_factor_volume, simulate_spi  # noqa: E402
from diffdask.simulate.common import poisson_frames  # noqa: E402


def _best(fn, repeat: int) -> tuple[float, float]:
    """Best wall-clock and best CPU (process) time of ``repeat`` runs, seconds."""
    wall, cpu = [], []
    for _ in range(repeat):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def run(n_frames: int, repeat: int) -> dict[str, float]:
    """Measure and print; return CPU-time frames/s per path."""
    geometry = dd.Geometry((128, 128), pixel_size_m=600e-6, distance_m=0.3, wavelength_m=6e-10)
    s_max = float(np.linalg.norm(geometry.scattering_vectors_inv_nm, axis=0).max())
    cube = Particle("superellipsoid", 42.0, exponent=6.0, name="rounded cube")
    sphere = Particle("sphere", (55.0, 84.0))
    t0 = time.perf_counter()
    volume = form_factor_volume(cube, s_max)
    build = time.perf_counter() - t0
    chunk = 512
    sliced = simulate_spi(n_frames, geometry, cube, seed=1, chunks=chunk)
    sliced_mu = simulate_spi(n_frames, geometry, cube, seed=1, chunks=chunk, noise=False)
    analytic = simulate_spi(n_frames, geometry, sphere, seed=1, chunks=chunk)
    mu = sliced_mu.frames.values.reshape(n_frames, -1)
    with dask.config.set(scheduler="synchronous"):
        times = {
            "floor (Poisson draw only)": _best(lambda: poisson_frames(mu, 1, 0), repeat),
            "slicing + Poisson": _best(lambda: sliced.frames.data.compute(), repeat),
            "slicing, expected photons": _best(lambda: sliced_mu.frames.data.compute(), repeat),
            "analytic sphere + Poisson": _best(lambda: analytic.frames.data.compute(), repeat),
        }
    print(f"python {platform.python_version()}, numpy {np.__version__}, {os.cpu_count()} cores, 1 thread used")
    print(f"{n_frames} frames of 128×128, |s| ≤ {s_max:.3f} nm⁻¹; reciprocal grid {volume.values.shape[0]}³ "
          f"(octant) for the 42 nm rounded cube, built in {build:.2f} s")
    floor_wall, floor_cpu = (n_frames / t for t in times["floor (Poisson draw only)"])
    print(f"{'path':32s} {'wall frames/s':>14s} {'÷ floor':>8s} {'CPU frames/s':>13s} {'÷ floor':>8s}")
    rates = {}
    for name, (wall, cpu) in times.items():
        rates[name] = n_frames / cpu
        print(f"{name:32s} {n_frames / wall:14.0f} {n_frames / wall / floor_wall:8.2f} "
              f"{n_frames / cpu:13.0f} {n_frames / cpu / floor_cpu:8.2f}")
    return rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-frames", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(args.n_frames, args.repeat)

"""Per-chunk costs of each pipeline step, for the cost model in docs/scaling.md.

Each step runs in this process on one chunk (threaded scheduler, one thread) and is timed in
CPU seconds (``time.process_time``), which a shared machine disturbs far less than wall time.
Figures are per 1 000 frames of 128×128 (EMC: 150×150, 20 classes × 36 rotations; common lines:
per 100×100-average tile of 215×215 averages).

Run: ``python benchmarks/scaling.py``.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import dask
import numpy as np

import diffdask as dd

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dragonfly_emc2d_bench"


def cpu(fn: Callable[[], object], repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="diffdask-scaling-"))
    rows: list[tuple[str, float, str]] = []
    g = dd.Geometry((128, 128), pixel_size_m=600e-6, distance_m=0.3, wavelength_m=6e-10)
    with dask.config.set(scheduler="threads", num_workers=1):
        sim = dd.simulate_spi(1000, g, particles=[dd.Particle("sphere", diameter_nm=(55, 84))],
                              fluence_photons_per_m2=2e22, seed=0, chunks=1000)
        rows.append(("simulate SPI (analytic spheres)", cpu(lambda: sim.frames.values), "frames generated"))
        frames = sim.frames.values.astype("uint16")
        ds = dd.make_frame_stack(frames, mask=np.ones((128, 128), bool), geometry=g, chunks=1000)
        rows.append(("save_frames (Zarr, zstd-3 + bitshuffle)", cpu(lambda: dd.save_frames(ds, work / "s.zarr", overwrite=True)),
                     f"{frames.nbytes / 1e6:.0f} MB raw"))
        stored = dd.open_frames(work / "s.zarr")
        rows.append(("read + decode from Zarr", cpu(lambda: stored.frames.values), ""))
        rows.append(("summarize (from Zarr: CoM, PSD, hits)",
                     cpu(lambda: dd.summarize(stored, threshold=0.5, min_lit=20).compute()), "one pass"))
        if DATA.exists():
            emc_ds = dd.read_emc(str(DATA / "photons.emc"), str(DATA / "det_sim.h5")).isel(frame=slice(0, 2000))
            emc_ds = emc_ds.chunk({"frame": 2000})
            start = dd.read_emc_output(str(DATA / "output_000.h5"))["intens"]
            times: list[float] = []
            marks = [time.process_time()]

            def mark(it: object) -> None:
                marks.append(time.process_time())
                times.append(marks[-1] - marks[-2])

            dd.EMC2D(20, 36).run(emc_ds, 3, start_models=start, callback=mark)
            rows.append(("EMC iteration (150×150, 20 × 36 orientations)", float(np.mean(times[1:])) / 2,
                         "per 1000 frames"))
        averages = np.random.default_rng(0).random((100, 215, 215))
        cc_cpu = cpu(lambda: dd.cc_matrix(averages, n_angles=180, mask_radius=20, block_size=100).compute(), repeat=1)
        rows.append(("common-line tile (100 × 100 averages, 180 angles)", cc_cpu, "per tile, not per 1000 frames"))
    shutil.rmtree(work, ignore_errors=True)
    print(f"# per-step CPU cost; {platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}, 2026-11-21")
    print("| step | CPU s per 1000 frames | note |")
    print("|---|---|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.3f} | {note} |")


if __name__ == "__main__":
    main()

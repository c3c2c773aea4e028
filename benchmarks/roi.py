"""Time of the ptychography region-of-interest step for a 16 000-frame scan.

Lin et al. report ≈ 10 s for CoM + k-means on 15 980 frames of 256×256. On one simulated
raster scan (`simulate_ptycho`: 3–5 µm cells, 0.5 µm Airy probe, 40 % overlap, 10⁵ photons
per frame) written to a Zarr store this measures, with the Dask threaded scheduler:

(a) the floor: one pass reading the store (`open_frames`, decompress + sum), which any RoI
    computed from stored frames pays;
(b) diffdask `find_roi(open_frames(store))`: one pass for the CoM and totals, then the
    whole-scan task (raster detection, 3×3 neighbourhood means, two k-means);
(c) the whole-scan task alone on the 16 000 × 5 per-frame numbers (`roi_kernel`);
(d) a peer written the obvious way on the frames held in memory: NumPy CoM, SciPy 3×3
    ``uniform_filter`` on the raster image, scikit-learn ``KMeans`` (same n_init).

It also prints recall and precision of the region against the simulator's footprint labels.

Run: ``python benchmarks/roi.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import numpy as np

import diffdask as dd
from diffdask.io import open_frames, save_frames
from diffdask.roi import roi_kernel


def best_of(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def numpy_peer(frames: np.ndarray, rows: int, cols: int, n_init: int) -> np.ndarray:
    """The paper's recipe on in-memory frames of a full raster (rows × cols positions)."""
    from scipy.ndimage import uniform_filter
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    total = frames.sum(axis=(1, 2), dtype=np.float64)
    iy = np.arange(frames.shape[1], dtype=np.float64)
    ix = np.arange(frames.shape[2], dtype=np.float64)
    cy = frames.sum(axis=2, dtype=np.float64) @ iy / total
    cx = frames.sum(axis=1, dtype=np.float64) @ ix / total
    magnitude = np.hypot((cy - cy.mean()) / cy.std(), (cx - cx.mean()) / cx.std())
    keep = np.zeros(len(total), bool)
    n = len(total)
    for values, high in ((total, False), (magnitude, True)):
        # A partial last line is padded with its last value, the usual quick fix.
        image = np.pad(values, (0, rows * cols - n), mode="edge").reshape(rows, cols)
        filtered = np.log(uniform_filter(image, 3, mode="nearest")).ravel()[:n]
        # One OpenMP thread as in diffdask: spinning threads cost seconds on a busy machine.
        with threadpool_limits(limits=1):
            km = KMeans(2, n_init=n_init, random_state=0).fit(filtered[:, None])
        want = np.argmax(km.cluster_centers_[:, 0]) if high else np.argmin(km.cluster_centers_[:, 0])
        keep |= km.labels_ == want
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-frames", type=int, default=16_000)
    parser.add_argument("--shape", type=int, default=128, help="Detector side, pixels.")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--store", default=None,
                        help="Keep the simulated scan in this Zarr store and reuse it when it exists "
                             "(default: a temporary store, deleted at the end).")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="diffdask-roi-"))
    try:
        store = Path(args.store) if args.store else work / "scan.zarr"
        if not store.exists():
            geometry = dd.Geometry((args.shape,) * 2, 75e-6, 2.0, 1.409e-10)
            scan = dd.simulate_ptycho(args.n_frames, geometry, probe_diameter_m=0.5e-6, overlap=0.4, coverage=0.3,
                                      particle_diameter_m=(3e-6, 5e-6), photons_per_frame=1e5, seed=0)
            t0 = time.perf_counter()
            save_frames(scan, store)
            print(f"simulated and stored {args.n_frames} frames of {args.shape}² in {time.perf_counter() - t0:.1f} s")
        ds = open_frames(store)
        args.n_frames, args.shape = ds.sizes["frame"], ds.sizes["y"]
        nbytes = ds.frames.nbytes
        rows, cols = ds.attrs["simulation"]["scan_shape"]

        t_floor, _ = best_of(lambda: ds.frames.sum().compute(), args.repeats)
        t_roi, roi = best_of(lambda: dd.find_roi(ds).compute(), args.repeats)
        block = np.column_stack([roi[n].values for n in ("scan_y", "scan_x", "total", "com_y", "com_x")])
        t_kernel, _ = best_of(lambda: roi_kernel(block, filter_size=3, n_init=10, seed=0), 3)
        frames = ds.frames.values
        t_peer, peer = best_of(lambda: numpy_peer(frames, rows, cols, 10), args.repeats)

        truth, kept = ds.in_object.values, roi.in_roi.values
        recall = (kept & truth).sum() / truth.sum()
        precision = (kept & truth).sum() / kept.sum()
        print(f"\n{platform.machine()}, {os.cpu_count()} cores, dask threaded scheduler, best of {args.repeats}")
        print(f"{args.n_frames} frames of {args.shape}×{args.shape} float32 ({nbytes / 1e9:.2f} GB), raster {rows}×{cols}\n")
        print("| step | time (s) | frames/s | ÷ read floor |")
        print("|---|---|---|---|")
        for name, t in (
            ("read floor (decompress + sum)", t_floor),
            ("find_roi from the store", t_roi),
            (f"whole-scan task alone ({args.n_frames} × 5 numbers)", t_kernel),
            ("peer: NumPy + SciPy + scikit-learn, frames in memory", t_peer),
        ):
            print(f"| {name} | {t:.2f} | {args.n_frames / t:.0f} | {t / t_floor:.2f} |")
        print(f"\nregion: {kept.sum()} of {kept.size} ({kept.mean():.1%}), footprint {truth.mean():.1%}, "
              f"recall {recall:.3f}, precision {precision:.3f}")
        if peer is not None:
            print(f"peer region agrees with diffdask on {np.mean(peer == kept):.1%} of positions")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    with dask.config.set(scheduler="threads"):
        main()

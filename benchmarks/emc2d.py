"""2D EMC per-iteration time: diffdask against Dragonfly's C ``emc``, same data, same run.

Input: ``shared/data/dragonfly_emc2d_bench`` (10 000 frames of 150×150 pixels, 20 classes ×
36 rotations, Dragonfly's start models). diffdask runs on a LocalCluster of 2 single-threaded
worker processes (float64, photons persisted as sparse chunks). Dragonfly runs as
``emc -t THREADS N`` from a binary you built yourself outside this repository (pass its path
with ``--dragonfly-emc``; diffdask ships neither its code nor a recipe to build it). Both runs
start from the same models; the script prints per-iteration times, the ratio, and the largest
relative difference between the two programs' models after the last iteration.

Run: ``python benchmarks/emc2d.py --iterations 3 [--dragonfly-emc /path/to/emc]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

import diffdask as dd
from diffdask.emc import EMC2D
from diffdask.io.dragonfly import read_emc, read_emc_output

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dragonfly_emc2d_bench"


def run_dragonfly(binary: str, data: Path, iterations: int, threads: int, workdir: Path) -> tuple[list[float], np.ndarray]:
    """Run Dragonfly's 2D EMC; return its per-iteration times (from its log) and final models."""
    out = workdir / "dragonfly"
    (out / "logs").mkdir(parents=True)
    shutil.copy(data / "output_000.h5", out / "start.h5")
    config = out / "config.ini"
    config.write_text(
        "[emc]\n"
        f"in_photons_file = {data / 'photons.emc'}\n"
        f"in_detector_file = {data / 'det_sim.h5'}\n"
        "recon_type = 2d\nnum_rot = 36\nnum_modes = 20\nneed_scaling = 1\n"
        "beta_schedule = 1.41421356 5\n"
        f"start_model_file = {out / 'start.h5'}\n"
        f"output_folder = {out}/\nlog_file = {out / 'logs' / 'EMC.log'}\n"
    )
    subprocess.run([binary, "-c", str(config), "-t", str(threads), str(iterations)], cwd=out, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times = []
    for line in (out / "logs" / "EMC.log").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"\d+", fields[0]) and len(fields) >= 6:
            times.append(float(fields[1]))
    return times, read_emc_output(str(out / f"output_{iterations:03d}.h5"))["intens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--dragonfly-emc", default=os.environ.get("DRAGONFLY_EMC"), help="path of a built Dragonfly emc")
    parser.add_argument("--threads", type=int, default=2, help="Dragonfly OpenMP threads")
    parser.add_argument("--workers", type=int, default=2, help="diffdask worker processes")
    parser.add_argument("--chunks", type=int, default=2, help="frame chunks for diffdask")
    args = parser.parse_args()
    data = Path(args.data)
    ds = read_emc(str(data / "photons.emc"), str(data / "det_sim.h5"))
    n = ds.sizes["frame"]
    ds = ds.chunk({"frame": -(-n // args.chunks)})
    start = read_emc_output(str(data / "output_000.h5"))["intens"]

    times: list[float] = []
    with dd.connect(n_workers=args.workers, threads_per_worker=1) as client:
        t0 = time.perf_counter()
        result = EMC2D(start.shape[0], 36, beta_schedule=(2**0.5, 5)).run(
            ds, args.iterations, start_models=start, callback=lambda it: times.append(it.time_s)
        )
        total = time.perf_counter() - t0
        client.close()
    setup = total - sum(times)
    ours = result.final.models[0]
    print(f"# emc2d: {n} frames {ds.frames.shape[1]}×{ds.frames.shape[2]}, {start.shape[0]} classes × 36 rotations, "
          f"{args.iterations} iterations")
    print(f"# {platform.machine()}, Python {platform.python_version()}, diffdask: {args.workers} worker processes × 1 thread, "
          f"{args.chunks} chunks, float64")
    print(f"diffdask per-iteration s: {', '.join(f'{t:.2f}' for t in times)} (setup {setup:.2f} s)")
    if args.dragonfly_emc:
        with tempfile.TemporaryDirectory() as tmp:
            df_times, df_models = run_dragonfly(args.dragonfly_emc, data, args.iterations, args.threads, Path(tmp))
        print(f"Dragonfly emc -t {args.threads} per-iteration s: {', '.join(f'{t:.2f}' for t in df_times)}")
        ratio = np.mean(df_times) / np.mean(times)
        print(f"speed-up (mean Dragonfly / mean diffdask iteration): {ratio:.2f}×")
        diff = np.abs(ours - df_models).max() / np.abs(df_models).max()
        print(f"max |diffdask − Dragonfly| / max |Dragonfly| of the final models: {diff:.2e}")


if __name__ == "__main__":
    main()

"""2D EMC per-iteration time: diffdask against Dragonfly's C ``emc``, same data, same run.

Input: ``shared/data/dragonfly_emc2d_bench`` (10 000 frames of 150×150 pixels, 20 classes ×
36 rotations, Dragonfly's start models). diffdask runs in-process on 2 threads (its CPU time is
then this process's, comparable with Dragonfly's on a loaded machine) and on a LocalCluster of
2 single-threaded worker processes (float64, photons persisted as sparse chunks). Dragonfly runs as
``emc -t THREADS N`` from a binary you built yourself outside this repository (pass its path
with ``--dragonfly-emc``; diffdask ships neither its code nor a recipe to build it). Both runs
start from the same models; the script prints per-iteration wall and CPU times, the ratios, and
the largest relative difference between the two programs' models after the last iteration.

Run: ``python benchmarks/emc2d.py --iterations 3 [--dragonfly-emc /path/to/emc]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import dask
import numpy as np

import diffdask as dd
from diffdask.emc import EMC2D
from diffdask.io.dragonfly import read_emc, read_emc_output

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dragonfly_emc2d_bench"


def run_dragonfly(binary: str, data: Path, iterations: int, threads: int, workdir: Path) -> tuple[list[float], float, np.ndarray]:
    """Run Dragonfly's 2D EMC; return its per-iteration wall times (its log), its CPU seconds, final models."""
    out = workdir / f"dragonfly-{iterations}"
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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([binary, "-c", str(config), "-t", str(threads), str(iterations)], cwd=out, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    times = []
    for line in (out / "logs" / "EMC.log").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"\d+", fields[0]) and len(fields) >= 6:
            times.append(float(fields[1]))
    return times, cpu, read_emc_output(str(out / f"output_{iterations:03d}.h5"))["intens"]


def run_diffdask(ds: Any, start: np.ndarray, iterations: int) -> tuple[list[float], list[float], np.ndarray]:
    """Per-iteration wall and CPU seconds of diffdask on the current scheduler, and final models."""
    wall: list[float] = []
    cpu: list[float] = []
    marks = [time.process_time()]

    def record(it: Any) -> None:
        wall.append(it.time_s)
        marks.append(time.process_time())
        cpu.append(marks[-1] - marks[-2])

    result = EMC2D(start.shape[0], 36, beta_schedule=(2**0.5, 5)).run(ds, iterations, start_models=start, callback=record)
    cpu[0] = float("nan")  # the first iteration's CPU mark includes the setup
    return wall, cpu, result.final.models[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--dragonfly-emc", default=os.environ.get("DRAGONFLY_EMC"), help="path of a built Dragonfly emc")
    parser.add_argument("--threads", type=int, default=2, help="Dragonfly OpenMP threads and diffdask threads")
    parser.add_argument("--chunks", type=int, default=2, help="frame chunks for diffdask")
    args = parser.parse_args()
    data = Path(args.data)
    ds = read_emc(str(data / "photons.emc"), str(data / "det_sim.h5"))
    n = ds.sizes["frame"]
    ds = ds.chunk({"frame": -(-n // args.chunks)})
    start = read_emc_output(str(data / "output_000.h5"))["intens"]
    print(f"# emc2d: {n} frames {ds.frames.shape[1]}×{ds.frames.shape[2]}, {start.shape[0]} classes × 36 rotations, "
          f"{args.iterations} iterations, float64; {platform.machine()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    # In-process threads: CPU time of the whole computation is this process's, comparable to
    # Dragonfly's CPU time even on a loaded machine.
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        wall_t, cpu_t, ours = run_diffdask(ds, start, args.iterations)
    print(f"diffdask ({args.threads} threads) per-iteration wall s: {', '.join(f'{t:.2f}' for t in wall_t)}; "
          f"CPU s: {', '.join(f'{t:.2f}' for t in cpu_t[1:])}")
    with dd.connect(n_workers=args.threads, threads_per_worker=1):
        wall_c, _, ours_c = run_diffdask(ds, start, args.iterations)
    print(f"diffdask (LocalCluster, {args.threads} processes) per-iteration wall s: {', '.join(f'{t:.2f}' for t in wall_c)}")
    assert np.array_equal(ours, ours_c)
    if args.dragonfly_emc:
        with tempfile.TemporaryDirectory() as tmp:
            df_times, df_cpu_n, df_models = run_dragonfly(args.dragonfly_emc, data, args.iterations, args.threads, Path(tmp))
            _, df_cpu_1, _ = run_dragonfly(args.dragonfly_emc, data, 1, args.threads, Path(tmp))
        df_cpu_iter = (df_cpu_n - df_cpu_1) / max(1, args.iterations - 1)
        print(f"Dragonfly emc -t {args.threads} per-iteration wall s: {', '.join(f'{t:.2f}' for t in df_times)}; "
              f"CPU s per iteration: {df_cpu_iter:.2f}")
        ours_cpu = float(np.nanmean(cpu_t))
        print(f"speed-up, CPU time per iteration: {df_cpu_iter / ours_cpu:.2f}×  "
              f"(Dragonfly {df_cpu_iter:.2f} s, diffdask {ours_cpu:.2f} s)")
        print(f"speed-up, wall time per iteration: threads {np.mean(df_times) / np.mean(wall_t):.2f}×, "
              f"LocalCluster {np.mean(df_times) / np.mean(wall_c):.2f}×")
        diff = np.abs(ours - df_models).max() / np.abs(df_models).max()
        print(f"max |diffdask − Dragonfly| / max |Dragonfly| of the final models: {diff:.2e}")


if __name__ == "__main__":
    main()

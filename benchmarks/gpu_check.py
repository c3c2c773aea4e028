"""Every GPU path of diffdask against its CPU result, timed against the device's read floor.

    python benchmarks/gpu_check.py [--frames 20000] [--size 128]

For each path: the largest relative difference from the CPU result (the contract is 1e-12 for
the reductions), the GPU time, and the ratio to the device's own floor — a CuPy
``frames.sum(axis=(1, 2))`` over the same frames already on the device. Prints one table and
exits 0; where no GPU is usable it says so and exits 0 without timing anything (so it can be
run anywhere as a smoke check). Run it on a GPU node whenever one is available and record the
table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import diffdask as dd
from diffdask.backend import gpu_available


def _best(fn: Callable[[], Any], sync: Callable[[], None], repeat: int = 3) -> tuple[float, Any]:
    out = fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _rel(gpu: Any, cpu: Any) -> float:
    g, c = np.asarray(gpu, dtype=np.float64), np.asarray(cpu, dtype=np.float64)
    both = np.isfinite(g) & np.isfinite(c)
    if not np.array_equal(np.isfinite(g), np.isfinite(c)):
        return float("inf")
    if not both.any():
        return 0.0
    scale = np.maximum(np.abs(c[both]), 1e-300)
    return float(np.max(np.abs(g[both] - c[both]) / scale))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=2_000)
    args = parser.parse_args()
    if not gpu_available():
        print("gpu_check: no usable CUDA device (CuPy missing or no GPU) — nothing to check here. "
              "Run this on a GPU node with `pip install -e .[gpu]`.")
        return 0
    import cupy
    import dask

    sync = cupy.cuda.Device().synchronize
    print(f"# gpu_check {time.strftime('%Y-%m-%d')} on {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, "
          f"host {platform.processor() or platform.machine()}")
    n, s = args.frames, args.size
    rng = np.random.default_rng(0)
    geom = dd.Geometry((s, s), pixel_size_m=75e-6, distance_m=0.15, wavelength_m=1e-10, beam_center_yx=(s / 2 - 0.3, s / 2 + 0.6))
    mask = np.ones((s, s), bool)
    mask[s // 2 - 2 : s // 2 + 2] = False
    rows = []
    for dtype in ("float32", "uint16"):
        frames = rng.poisson(2.0, size=(n, s, s)).astype(dtype)
        if dtype == "float32":
            frames[3, 5, 5] = np.nan
        cpu_ds = dd.make_frame_stack(frames, mask=mask, geometry=geom, chunks=args.chunk)
        gpu_ds = dd.to_gpu(cpu_ds).persist()
        dev = gpu_ds.frames.data
        floor, _ = _best(lambda: dask.compute(dev.sum(axis=(1, 2)), scheduler="sync")[0], sync)
        cases: dict[str, Callable[[Any], Any]] = {
            "center_of_mass": lambda d: dd.center_of_mass(d),
            "radial_profile": lambda d: dd.radial_profile(d),
            "summarize": lambda d: dd.summarize(d, threshold=3.0),
            "integrate1d poisson": lambda d: dd.integrate1d(d, 100, error_model="poisson"),
            "integrate2d": lambda d: dd.integrate2d(d, 50, 36),
        }
        for name, build in cases.items():
            with dask.config.set(scheduler="sync"):
                cpu = build(cpu_ds).compute()
                t, gpu = _best(lambda: build(gpu_ds).compute(), sync)
            worst = max(_rel(dd.backend.to_cpu(gpu[v].data), cpu[v].values) for v in cpu.data_vars)
            rows.append((f"{name} ({dtype})", worst, t, floor / t))
    rows += _predict_rows(sync)
    print(f"{'path':34s} {'max rel diff':>13s} {'GPU s':>8s} {'× floor':>8s}")
    for name, worst, t, ratio in rows:
        print(f"{name:34s} {worst:13.2e} {t:8.3f} {ratio:8.2f}")
    bad = [r for r in rows if r[0].split(" (")[0] != "predict" and not r[1] <= 1e-12]
    if bad:
        print("FAILED: GPU results differ from CPU by more than 1e-12:", [r[0] for r in bad])
        return 1
    return 0


def _predict_rows(sync: Callable[[], None]) -> list[tuple[str, float, float, float]]:
    # torch CUDA inference of a real (seeded, untrained) hit classifier against its CPU run.
    import tempfile
    from pathlib import Path

    import dask
    import torch

    from diffdask.ml import HitClassifier, ModelSpec, Preprocess, predict, save_model

    if not torch.cuda.is_available():
        return [("predict (torch CUDA)", float("nan"), float("nan"), float("nan"))]
    torch.manual_seed(0)
    model = HitClassifier(width=8, blocks_per_stage=(1, 1)).eval()
    spec = ModelSpec("HitClassifier", {"width": 8, "blocks_per_stage": [1, 1]},
                     Preprocess(crop=(64, 64), scale="log1p", normalize="max").to_dict(), ["single", "other"])  # fmt: skip
    frames = np.random.default_rng(1).poisson(2.0, size=(4096, 128, 128)).astype("uint16")
    ds = dd.make_frame_stack(frames, chunks=1024)
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="sync"):
        path = save_model(model, Path(tmp) / "hit.pt", spec)
        cpu = predict(ds, str(path), device="cpu").compute()
        t, gpu = _best(lambda: predict(ds, str(path), device="cuda").compute(), torch.cuda.synchronize, repeat=1)
        t_cpu, _ = _best(lambda: predict(ds, str(path), device="cpu").compute(), lambda: None, repeat=1)
    worst = max(_rel(gpu[v].values, cpu[v].values) for v in cpu.data_vars)
    # Convolutions on the GPU use other algorithms (TF32 off by default for fp32): ~1e-6, not bits.
    return [("predict (torch CUDA, × CPU time)", worst, t, t_cpu / t)]


if __name__ == "__main__":
    sys.exit(main())

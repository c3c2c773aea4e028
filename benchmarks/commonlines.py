"""Common-line CC matrix: diffdask's blocked GEMM-plus-max tiles against pairwise loops.

Run: ``python benchmarks/commonlines.py`` (defaults: 200 averages of 215×215, 180 angles,
mask radius 20, nearest sampling; then 2 000 averages). In the same run it times

- the slow, obvious reference: a loop over pairs of averages and pairs of angles with one
  ``np.corrcoef`` each (a few pairs timed, extrapolated to all M(M−1)/2 pairs);
- a Dragonfly-style pairwise loop (as ``utils/py_src/calc_cc.py`` does per pair: one
  ``np.corrcoef`` of the 2·A lines of both averages, max of the off-diagonal block), one
  process, timed on a subset of pairs and extrapolated; the lines are sampled once
  beforehand, which favours the loop (Dragonfly resamples both averages for every pair);
- diffdask's ``cc_matrix`` on the Dask threaded scheduler (one thread per core, BLAS limited
  to one thread per Dask thread): exact float64 (low-rank float32 screening + float64
  refinement, the default), float64 without screening, and float32;

checks that the loops and diffdask agree on the timed pairs, and prints the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import dask
import numpy as np
from scipy.spatial.transform import Rotation
from threadpoolctl import threadpool_limits

from diffdask.commonlines import cc_matrix, line_samples


def simulated_averages(n: int, size: int, seed: int) -> np.ndarray:
    """Noise-free central slices |F(q)|² of cubes and spheres of several sizes, random orientations."""
    rng = np.random.default_rng(seed)
    # About ten speckles from the centre to the edge, as in oversampled SPI averages.
    q = (np.arange(size) - size // 2) * (60.0 / size)
    qy, qx = np.meshgrid(q, q, indexing="ij")
    plane = np.stack([qx, qy, np.zeros_like(qx)], axis=-1)
    out = np.empty((n, size, size))
    for k, rot in enumerate(Rotation.random(n, random_state=rng)):
        kq = plane @ rot.as_matrix().T
        scale = rng.uniform(0.8, 1.2)
        if k % 2:
            amp = np.prod(np.sinc(kq * scale / np.pi), axis=-1)
        else:
            qr = np.maximum(np.linalg.norm(kq, axis=-1) * scale, 1e-6)
            amp = 3 * (np.sin(qr) - qr * np.cos(qr)) / qr**3
        out[k] = amp**2 + 1e-6
    return out


def dragonfly_style_pair(lines_i: np.ndarray, lines_j: np.ndarray) -> float:
    """One pair as Dragonfly's loop does it: corrcoef of all 2·A lines, max of the cross block."""
    a = lines_i.shape[0]
    return float(np.corrcoef(lines_i, lines_j)[:a, a:].max())


def angle_pair_loop(lines_i: np.ndarray, lines_j: np.ndarray) -> float:
    """One pair, the obvious way: one np.corrcoef per pair of angles."""
    return max(np.corrcoef(x, y)[0, 1] for x in lines_i for y in lines_j)


def time_diffdask(averages: np.ndarray, args: argparse.Namespace, **options) -> tuple[float, np.ndarray]:
    cc = cc_matrix(averages, args.angles, args.mask_radius, args.interp, block_size=args.block_size, **options)
    with threadpool_limits(1), dask.config.set(scheduler="threads", num_workers=os.cpu_count()):
        start = time.perf_counter()
        result = cc.compute()
        return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="averages")
    parser.add_argument("--size", type=int, default=215, help="side of the averages, pixels")
    parser.add_argument("--angles", type=int, default=180)
    parser.add_argument("--mask-radius", type=float, default=20)
    parser.add_argument("--interp", default="nearest")
    parser.add_argument("--block-size", type=int, default=None, help="averages per tile side (default: cc_matrix's)")
    parser.add_argument("--loop-pairs", type=int, default=3, help="pairs timed with the angle-pair loop")
    parser.add_argument("--dragonfly-pairs", type=int, default=100, help="pairs timed Dragonfly-style")
    parser.add_argument("--n-large", type=int, default=2000, help="averages of the large run (0: skip)")
    args = parser.parse_args()

    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    averages = simulated_averages(args.n, args.size, seed=1)
    n_pairs = args.n * (args.n - 1) // 2
    rng = np.random.default_rng(2)
    pairs = [tuple(sorted(rng.choice(args.n, 2, replace=False))) for _ in range(max(args.loop_pairs, args.dragonfly_pairs))]

    t_exact, cc = time_diffdask(averages, args)
    t_dense, cc_dense = time_diffdask(averages, args, screen=False)
    t_f32, cc_f32 = time_diffdask(averages, args, dtype="float32")
    assert np.abs(cc - cc_dense).max() < 1e-12, "screened and dense float64 differ"

    lines = np.asarray(line_samples(averages, args.angles, args.mask_radius, args.interp).compute())
    start = time.perf_counter()
    loop = [angle_pair_loop(lines[i], lines[j]) for i, j in pairs[: args.loop_pairs]]
    t_loop = (time.perf_counter() - start) / args.loop_pairs * n_pairs
    start = time.perf_counter()
    dragonfly = [dragonfly_style_pair(lines[i], lines[j]) for i, j in pairs[: args.dragonfly_pairs]]
    t_dragonfly = (time.perf_counter() - start) / args.dragonfly_pairs * n_pairs
    diff_loop = max(abs(v - cc[i, j]) for v, (i, j) in zip(loop, pairs))
    diff_dragonfly = max(abs(v - cc[i, j]) for v, (i, j) in zip(dragonfly, pairs))

    print(f"\n{args.n} averages of {args.size}×{args.size}, {args.angles} angles, mask radius "
          f"{args.mask_radius:g} px, {args.interp}, {lines.shape[-1]} samples per line, "
          f"{n_pairs} pairs, block size {args.block_size or 'default'}")
    print("| method | time (s) | vs diffdask exact float64 |")
    print("| --- | ---: | ---: |")
    print(f"| angle-pair loop, np.corrcoef per angle pair ({args.loop_pairs} pairs timed, extrapolated) "
          f"| {t_loop:.0f} | {t_loop / t_exact:.0f}× slower |")
    print(f"| Dragonfly-style pair loop, 1 process ({args.dragonfly_pairs} pairs timed, extrapolated) "
          f"| {t_dragonfly:.1f} | {t_dragonfly / t_exact:.1f}× slower |")
    print(f"| diffdask cc_matrix, float64 exact (low-rank float32 screen + float64 refine) | {t_exact:.2f} | 1 |")
    print(f"| diffdask cc_matrix, float64, screen=False | {t_dense:.2f} | {t_dense / t_exact:.2f}× |")
    print(f"| diffdask cc_matrix, float32 | {t_f32:.2f} | {t_f32 / t_exact:.2f}× |")
    print(f"max |loop − diffdask| on the timed pairs: {diff_loop:.1e} (angle-pair loop), "
          f"{diff_dragonfly:.1e} (Dragonfly-style); float32 vs float64: {np.abs(cc_f32 - cc).max():.1e}")

    if args.n_large:
        large = simulated_averages(args.n_large, args.size, seed=3)
        t_large, _ = time_diffdask(large, args)
        print(f"\n{args.n_large} averages, float64 exact: {t_large:.1f} s "
              f"({t_large / t_exact:.0f}× the {args.n}-average run for {(args.n_large / args.n) ** 2:.0f}× the pairs)")


if __name__ == "__main__":
    main()

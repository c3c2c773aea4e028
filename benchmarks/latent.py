"""Latent-space sorting of single hits on simulated mixtures, and fit/transform throughput.

(a) Sorting. For each single-hit fraction (0.80, 0.90, 0.95, 0.99) `simulate_spi` makes
    ``--n-frames`` frames of PR772-like icosahedral capsids (65–75 nm, 128×128 detector with
    panel gaps and a beamstop, Gamma(2) shot-to-shot fluence jitter, Poisson photons); multiple
    hits hold 2–4 particles 20–50 nm apart. Each preprocessing variant is fitted
    (`fit_latent`, incremental), every frame projected (`transform`) and flagged
    (`flag_outliers` with contamination = 1 − fraction). Reported against the ground truth
    with the positive class = single hit: TPR (singles kept), FPR (multiple hits kept), F1
    and ROC AUC of −outlier_score.
(b) Throughput of `fit_latent` + `transform` on ``--throughput-frames`` frames, generated
    lazily from a bank of simulated patterns (Poisson counts drawn per chunk), against the
    floor of generating and summing the same frames.

Run: ``python benchmarks/latent.py`` (every variant at every fraction, about an hour on 2 cores);
the BENCHMARKS.md tables are ``--fractions 0.8`` (all variants), ``--variants main`` (every
fraction) and ``--skip-sorting`` (throughput). ``--help`` for sizes; prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import dask
import numpy as np
from threadpoolctl import threadpool_limits

import diffdask as dd
from diffdask import latent, metrics
from diffdask.blocks import generate_frames
from diffdask.simulate import Particle, detector_mask

FRACTIONS = (0.80, 0.90, 0.95, 0.99)
#: Preprocessing variants explored: (label, fit_latent options, use residual in the envelope).
VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    ("poster: whole frame, latent only", {}, False),
    ("whole frame, latent + log residual", {}, True),
    ("crop 64, latent only", {"crop": 64}, False),
    ("crop 64, latent + log residual", {"crop": 64}, True),
    ("crop 64, 5 components, latent + log residual", {"crop": 64, "n_components": 5}, True),
    ("crop 64, 5 components, randomized, latent + log residual",
     {"crop": 64, "n_components": 5, "method": "randomized"}, True),
    ("crop 64, bin 2, latent + log residual", {"crop": 64, "downsample": "bin", "factor": 2}, True),
    ("crop 64, Fourier ÷2, latent + log residual", {"crop": 64, "downsample": "fourier", "factor": 2}, True),
    ("crop 64, sqrt, latent + log residual", {"crop": 64, "intensity": "sqrt"}, True),
    ("crop 64, log, latent + log residual", {"crop": 64, "intensity": "log"}, True),
]
CHOSEN = "crop 64, 5 components, latent + log residual"


def geometry() -> dd.Geometry:
    return dd.Geometry((128, 128), 600e-6, 0.3, 6e-10)


def simulate(n_frames: int, fraction: float, seed: int) -> Any:
    g = geometry()
    ds = dd.simulate_spi(
        n_frames,
        g,
        Particle("icosahedral_shell", (65.0, 75.0)),
        single_hit_fraction=fraction,
        fluence_jitter_shape=2.0,
        mask=detector_mask(g, gap_px=4, beamstop_radius_px=4),
        seed=seed,
        chunks=500,
    )
    frames, single = dask.compute(ds["frames"].data, ds["single_hit"].data)
    return dd.make_frame_stack(frames, mask=ds["mask"].values, geometry=g, chunks=500), single


def sort_once(ds: Any, truth: np.ndarray, fraction: float, options: dict[str, Any], residual: bool) -> dict[str, float]:
    options = dict(options)
    k = options.pop("n_components", 3)
    t0 = time.perf_counter()
    model = latent.fit_latent(ds, k, **options)
    z = latent.transform(ds, model).compute()
    flags = latent.flag_outliers(
        z["latent"], 1.0 - fraction, residual=z["residual"] if residual else None
    ).compute()
    report = metrics.classification_report(truth, flags["single_hit"].values, -flags["outlier_score"].values)
    report["seconds"] = time.perf_counter() - t0
    return report


def _bank_kernel(start: int, stop: int, *, bank: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, start])
    mu = bank[rng.integers(0, len(bank), stop - start)]
    return {"frames": rng.poisson(mu).astype(np.float32)}


def throughput(n_frames: int, bank_frames: int, chunk: int) -> dict[str, float]:
    g = geometry()
    sim = dd.simulate_spi(
        bank_frames,
        g,
        Particle("icosahedral_shell", (65.0, 75.0)),
        single_hit_fraction=0.9,
        mask=detector_mask(g, gap_px=4, beamstop_radius_px=4),
        noise=False,
        seed=7,
        chunks=250,
    )
    bank = sim["frames"].values
    frames = generate_frames(
        _bank_kernel, n_frames, chunk, {"frames": ((128, 128), np.float32)}, {"bank": bank, "seed": 3}, name="bank"
    )["frames"]
    ds = dd.make_frame_stack(frames, mask=sim["mask"].values, geometry=g, chunks=chunk)
    def floor() -> float:
        t0 = time.perf_counter()
        ds["frames"].data.sum().compute()
        return time.perf_counter() - t0

    # The floor is measured before and after the fits (best of the two): on a shared machine
    # a single measurement can land in a busier moment than the fits.
    out = {"n_frames": n_frames, "floor_s": floor()}
    for method in ("incremental", "randomized"):
        t0 = time.perf_counter()
        model = latent.fit_latent(ds, 3, method, crop=64)
        t1 = time.perf_counter()
        latent.transform(ds, model)["latent"].data.compute()
        t2 = time.perf_counter()
        out[f"{method}_fit_s"] = t1 - t0
        out[f"{method}_transform_s"] = t2 - t1
    out["floor_s"] = min(out["floor_s"], floor())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-frames", type=int, default=10_000, help="Frames per mixture.")
    parser.add_argument("--throughput-frames", type=int, default=100_000)
    parser.add_argument("--bank-frames", type=int, default=500, help="Simulated patterns the throughput stack draws from.")
    parser.add_argument("--chunk", type=int, default=1000, help="Frames per chunk of the throughput stack.")
    parser.add_argument("--variants", default="all",
                        help="'all', 'chosen' (only the chosen preprocessing) or 'main' (chosen, also randomized, "
                             "3 components + residual, latent only).")
    parser.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="Single-hit fractions, comma-separated.")
    parser.add_argument("--skip-sorting", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}")
    main_labels = {CHOSEN, "crop 64, latent + log residual", "crop 64, latent only",
                   "crop 64, 5 components, randomized, latent + log residual"}
    variants = {
        "all": VARIANTS,
        "main": [v for v in VARIANTS if v[0] in main_labels],
        "chosen": [v for v in VARIANTS if v[0] == CHOSEN],
    }[args.variants]
    fractions = [float(f) for f in args.fractions.split(",")]
    dask.config.set(scheduler="threads", num_workers=os.cpu_count())
    # Dask threads × BLAS threads must not exceed the cores.
    with threadpool_limits(1):
        if not args.skip_sorting:
            rows = []
            for fraction in fractions:
                t0 = time.perf_counter()
                # The seed follows the mixture, so a run of some fractions repeats those of a full run.
                ds, truth = simulate(args.n_frames, fraction, seed=100 + FRACTIONS.index(fraction))
                print(f"simulated {args.n_frames} frames at {fraction:.2f} in {time.perf_counter() - t0:.0f} s "
                      f"({int((~truth).sum())} multiple hits)", flush=True)
                for label, options, residual in variants:
                    r = sort_once(ds, truth, fraction, options, residual)
                    rows.append((fraction, label, r))
                    print(f"| {fraction:.2f} | {label} | {r['tpr']:.4f} | {r['fpr']:.4f} | {r['f1']:.4f} | "
                          f"{r['roc_auc']:.4f} | {r['seconds']:.0f} |", flush=True)
            print("\n| single fraction | preprocessing | TPR (singles kept) | FPR (multis kept) | F1 | ROC AUC | s |")
            print("|---|---|---|---|---|---|---|")
            for fraction, label, r in sorted(rows, key=lambda x: (x[1] != CHOSEN, x[1], x[0])):
                print(f"| {fraction:.2f} | {label} | {r['tpr']:.4f} | {r['fpr']:.4f} | {r['f1']:.4f} | "
                      f"{r['roc_auc']:.4f} | {r['seconds']:.0f} |")
        if not args.skip_throughput:
            t = throughput(args.throughput_frames, args.bank_frames, args.chunk)
            n = t["n_frames"]
            print(f"\nthroughput, {n} frames 128×128 (crop 64, 3 components), floor (generate + sum) "
                  f"{n / t['floor_s']:.0f} frames/s")
            print("| method | fit frames/s | transform frames/s | fit + transform frames/s | ÷ floor |")
            print("|---|---|---|---|---|")
            for method in ("incremental", "randomized"):
                fit, tr = t[f"{method}_fit_s"], t[f"{method}_transform_s"]
                print(f"| {method} | {n / fit:.0f} | {n / tr:.0f} | {n / (fit + tr):.0f} | "
                      f"{(n / (fit + tr)) / (n / t['floor_s']):.2f} |")


if __name__ == "__main__":
    main()

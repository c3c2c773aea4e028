"""Beam-centre and detector-tilt regression (Lin et al., UCSB poster) on simulated Bragg images.

Data: `simulate_bragg` on a 128×128 detector (400 µm pixels at 6 cm ± 10 %, λ = 1 Å), beam
centre jittered ± 10 px around the detector centre, pitch and yaw uniform in ± 3°, random
triclinic-ish cells (4–10 nm) in random orientations, Poisson photons, hot and dead pixels and a
beamstop shadow. Two backgrounds: "standard" (diffuse water and polymer rings, centred on the
beam and made elliptical by the tilt) and "flat" (uniform photons: only the Bragg spots and the
beamstop shadow carry the geometry — the poster's failure case).

Regressors (`train_regressor`, `GeometryRegressor`: ResNet-18 layout, ``--width`` filters in
the first stage) of beam_center_y, beam_center_x, pitch_deg, yaw_deg, one per configuration:

- "poster": trained on standard images, plain ResNet (no position channels), as in the poster;
- "standard + xy": trained on standard images, with the two position channels (CoordConv);
- "mixed + xy": position channels, trained on an equal mix of standard and flat images (the
  poster's remedy: more varied backgrounds, so the rings cannot be the only cue).

Each is scored on held-out standard and flat test sets: mean absolute error of the beam centre
(pixels) and of pitch and yaw (degrees). Data sets are written once under ``--workdir``.

Run: ``python benchmarks/geometry_regressor.py --workdir /tmp/geometry`` (``--help`` for sizes).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

import diffdask as dd
from diffdask.ml import Preprocess, TrainConfig, predict, train_regressor
from diffdask.simulate import simulate_bragg

TARGETS = ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg")


def geometry() -> dd.Geometry:
    return dd.Geometry((128, 128), 400e-6, 0.06, 1e-10)


def stored_set(path: Path, n: int, variant: str, seed: int) -> xr.Dataset:
    """A Bragg data set at ``path``, simulated and saved on first use."""
    if not path.exists():
        ds = simulate_bragg(n, geometry(), variant=variant, seed=seed, chunks=500)
        dd.save_frames(ds, str(path), batch_frames=500)
    return dd.open_frames(str(path))


def _progress(step: int, total: int, loss: float) -> None:
    if step % 500 == 0 or step == total:
        print(f"#   step {step}/{total} loss {loss:.4f}", flush=True)


def mae(model: str, ds: xr.Dataset) -> dict[str, float]:
    with dd.connect(n_workers=2, threads_per_worker=1):
        predicted = predict(ds, model).predictions.values
    truth = np.stack([ds[t].values for t in TARGETS], axis=1)
    err = np.abs(predicted - truth)
    return {"center_px": float(np.hypot(err[:, 0], err[:, 1]).mean()), "center_y_px": float(err[:, 0].mean()),
            "center_x_px": float(err[:, 1].mean()), "pitch_deg": float(err[:, 2].mean()),
            "yaw_deg": float(err[:, 3].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="geometry_regressor_run")
    parser.add_argument("--train-frames", type=int, default=20_000, help="Training images per model.")
    parser.add_argument("--test-frames", type=int, default=2_000, help="Images per test set.")
    parser.add_argument("--width", type=int, default=64, help="Filters of the first stage (ResNet-18: 64).")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--configs", default="poster,standard + xy,mixed + xy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    half = args.train_frames // 2
    standard = stored_set(work / "train_standard.zarr", args.train_frames, "standard", seed=11)
    flat = stored_set(work / "train_flat.zarr", half, "flat", seed=12)
    tests = {v: stored_set(work / f"test_{v}.zarr", args.test_frames, v, seed=21 + i)
             for i, v in enumerate(("standard", "flat"))}
    print(f"# data: {time.perf_counter() - t0:.0f} s; {platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, width {args.width}, {args.steps} steps, lr {args.learning_rate}, seed {args.seed}")
    keep = [*TARGETS, "frames"]
    mixed = xr.concat([standard.isel(frame=slice(0, args.train_frames - half))[keep], flat[keep]], dim="frame",
                      combine_attrs="override").assign(mask=standard["mask"] & flat["mask"])
    configs: dict[str, tuple[xr.Dataset, bool]] = {
        "poster": (standard, False), "standard + xy": (standard, True), "mixed + xy": (mixed, True)}
    print("| configuration | test set | centre MAE px (y / x) | pitch MAE ° | yaw MAE ° | train s |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        ds, coordinates = configs[name]
        config = TrainConfig(architecture="GeometryRegressor",
                             arch_kwargs={"width": args.width, "coordinates": coordinates},
                             preprocess=Preprocess(scale="log1p"), steps=args.steps,
                             learning_rate=args.learning_rate, seed=args.seed)
        t0 = time.perf_counter()
        folder = work / name.replace(" + ", "_").replace(" ", "_")
        result = train_regressor(ds.chunk({"frame": 500}), list(TARGETS), str(folder), config, progress=_progress)
        t_train = time.perf_counter() - t0
        for variant, test in tests.items():
            m = mae(result["model"], test)
            print(f"| {name} | {variant} | {m['center_px']:.2f} ({m['center_y_px']:.2f} / {m['center_x_px']:.2f}) | "
                  f"{m['pitch_deg']:.3f} | {m['yaw_deg']:.3f} | {t_train:.0f} |", flush=True)


if __name__ == "__main__":
    main()

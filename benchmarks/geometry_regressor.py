"""Beam-centre and detector-tilt regression (Lin et al., UCSB poster) on simulated Bragg images.

Data: `simulate_bragg` on a 128×128 detector (400 µm pixels at 6 cm ± 10 %, λ = 1 Å), beam
centre jittered ± 10 px around the detector centre, pitch and yaw uniform in ± 3°, random
triclinic-ish cells (4–10 nm) in random orientations (``--mosaicity-deg``, ``--domain-size-nm``
set how many reflections light up), Poisson photons, hot and dead pixels and a beamstop shadow. Two backgrounds: "standard" (diffuse water and polymer rings, centred on the
beam and made elliptical by the tilt) and "flat" (uniform photons: only the Bragg spots and the
beamstop shadow carry the geometry — the poster's failure case).

Regressors (`train_regressor`, `GeometryRegressor`: ResNet-18 layout, ``--width`` filters in
the first stage) of beam_center_y, beam_center_x, pitch_deg, yaw_deg, one per configuration:

- "poster": trained on standard images, plain ResNet (no position channels), as in the poster;
- "standard + xy": trained on standard images, with the two position channels (CoordConv);
- "mixed + xy": position channels, trained on an equal mix of standard and flat images (the
  poster's remedy: more varied backgrounds, so the rings cannot be the only cue).

Each is scored on held-out standard and flat test sets: mean absolute error of the beam centre
(pixels) and of pitch and yaw (degrees). Then the network's predictions start
`diffdask.refine_geometry`, a per-frame fit of the water and polymer rings (their q known, as a
calibrant's are): rows "→ ring refinement" score its result (frames without rings keep the
network's values), with the share of frames refined and the median standard error the fit
reports — the information the rings hold, a Cramér–Rao bound for any estimator that reads them.
Rows "nominal start → ring refinement" fit without any network, from the nominal untilted
geometry, on the standard test set and on one whose rings are ``--bright`` times brighter.
Rows "one detector" refine runs of ``--run-frames`` frames that share one geometry (as a real
run does) with `diffdask.refine_run_geometry`: one fit to all their rings.
Data sets are written once under ``--workdir``; ``--reuse`` takes trained models found there.

Run: ``python benchmarks/geometry_regressor.py --workdir /tmp/geometry`` (``--help`` for sizes).
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
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
from diffdask.simulate.bragg import PLASTIC_RING, WATER_RING

TARGETS = ("beam_center_y", "beam_center_x", "pitch_deg", "yaw_deg")
#: The simulator's default beamstop shadow radius, pixels.
BEAMSTOP_PX = 6.0
#: Geometry of the fixed-detector runs: beam centre (pixels), (pitch, yaw) (degrees), distance (m).
RUN_CENTER = (66.7, 61.1)
RUN_TILT = (1.3, -0.7)
RUN_DISTANCE = 0.061


def geometry() -> dd.Geometry:
    return dd.Geometry((128, 128), 400e-6, 0.06, 1e-10)


#: The simulator's background rings as (q centre, q σ), nm⁻¹ (q = 2π/d).
RINGS = [(2 * math.pi * WATER_RING[0], 2 * math.pi * WATER_RING[1]),
         (2 * math.pi * PLASTIC_RING[0], 2 * math.pi * PLASTIC_RING[1])]


def stored_set(path: Path, n: int, variant: str, seed: int, crystal: dict[str, float]) -> xr.Dataset:
    """A Bragg data set at ``path``, simulated and saved on first use."""
    if not path.exists():
        ds = simulate_bragg(n, geometry(), variant=variant, seed=seed, chunks=500, **crystal)
        dd.save_frames(ds, str(path), batch_frames=500)
    return dd.open_frames(str(path))


def _progress(step: int, total: int, loss: float) -> None:
    if step % 500 == 0 or step == total:
        print(f"#   step {step}/{total} loss {loss:.4f}", flush=True)


def scores(predicted: np.ndarray, ds: xr.Dataset) -> dict[str, float]:
    """Mean absolute errors of (n, 4) predictions of `TARGETS`."""
    truth = np.stack([ds[t].values for t in TARGETS], axis=1)
    err = np.abs(predicted - truth)
    return {"center_px": float(np.hypot(err[:, 0], err[:, 1]).mean()), "center_y_px": float(err[:, 0].mean()),
            "center_x_px": float(err[:, 1].mean()), "pitch_deg": float(err[:, 2].mean()),
            "yaw_deg": float(err[:, 3].mean())}


def refinement(ds: xr.Dataset, initial: xr.DataArray | None) -> tuple[dict[str, float], str]:
    """Scores after ring refinement from ``initial`` (None: the nominal geometry), and a summary."""
    t0 = time.perf_counter()
    fit = dd.refine_geometry(ds, RINGS, initial=initial, exclude_radius_px=BEAMSTOP_PX + 2).compute()
    seconds = time.perf_counter() - t0
    refined = fit["refined"].values
    sigma = fit[["pitch_deg_error", "yaw_deg_error"]].to_array().values[:, refined]
    bound = f", median σ tilt {np.median(sigma):.3f}°" if sigma.size else ""
    summary = f"{refined.mean():.0%} refined{bound}, {len(refined) / seconds:.1f} frames/s"
    return scores(np.stack([fit[t].values for t in TARGETS], axis=1), ds), summary


def evaluate(model: str, ds: xr.Dataset, refine: bool) -> tuple[dict[str, float], dict[str, float] | None, str]:
    """Network scores, then (if ``refine``) scores after ring refinement and its summary."""
    with dd.connect(n_workers=2, threads_per_worker=1):
        predictions = predict(ds, model).predictions.compute()
        if not refine:
            return scores(predictions.values, ds), None, ""
        refined, summary = refinement(ds, predictions)
    return scores(predictions.values, ds), refined, summary


def row(name: str, variant: str, m: dict[str, float], extra: str) -> str:
    return (f"| {name} | {variant} | {m['center_px']:.2f} ({m['center_y_px']:.2f} / {m['center_x_px']:.2f}) | "
            f"{m['pitch_deg']:.3f} | {m['yaw_deg']:.3f} | {extra} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="geometry_regressor_run")
    parser.add_argument("--train-frames", type=int, default=20_000, help="Training images per model.")
    parser.add_argument("--test-frames", type=int, default=2_000, help="Images per test set.")
    parser.add_argument("--width", type=int, default=64, help="Filters of the first stage (ResNet-18: 64).")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--configs", default="poster,standard + xy,mixed + xy")
    parser.add_argument("--refine", default="poster,mixed + xy", help="Configurations whose predictions start ring refinement.")
    parser.add_argument("--mosaicity-deg", type=float, default=0.02)
    parser.add_argument("--domain-size-nm", type=float, default=1000.0)
    parser.add_argument("--reuse", action="store_true", help="Take models already trained in the workdir.")
    parser.add_argument("--bright", type=float, default=10.0,
                        help="Also refine, from the nominal geometry, a test set with rings this many times brighter "
                             "(0: skip the rows that start from the nominal geometry).")
    parser.add_argument("--run-frames", default="10,100,1000",
                        help="Sizes of fixed-detector runs refined with one shared geometry ('' to skip).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    half = args.train_frames // 2
    crystal = {"mosaicity_deg": args.mosaicity_deg, "domain_size_nm": args.domain_size_nm}
    standard = stored_set(work / "train_standard.zarr", args.train_frames, "standard", 11, crystal)
    flat = stored_set(work / "train_flat.zarr", half, "flat", 12, crystal)
    tests = {v: stored_set(work / f"test_{v}.zarr", args.test_frames, v, 21 + i, crystal)
             for i, v in enumerate(("standard", "flat"))}
    spots = float(tests["standard"]["n_spots"].mean())
    print(f"# data: {time.perf_counter() - t0:.0f} s, {spots:.0f} spots per test image; {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, width {args.width}, {args.steps} steps, "
          f"lr {args.learning_rate}, seed {args.seed}")
    keep = [*TARGETS, "frames"]
    mixed = xr.concat([standard.isel(frame=slice(0, args.train_frames - half))[keep], flat[keep]], dim="frame",
                      combine_attrs="override").assign(mask=standard["mask"] & flat["mask"])
    configs: dict[str, tuple[xr.Dataset, bool]] = {
        "poster": (standard, False), "standard + xy": (standard, True), "mixed + xy": (mixed, True)}
    to_refine = set(args.refine.split(",")) if args.refine else set()
    print("| configuration | test set | centre MAE px (y / x) | pitch MAE ° | yaw MAE ° | train s / notes |")
    print("|---|---|---|---|---|---|")
    for name in filter(None, args.configs.split(",")):
        ds, coordinates = configs[name]
        folder = work / name.replace(" + ", "_").replace(" ", "_")
        t0 = time.perf_counter()
        if args.reuse and (folder / "model.json").exists():
            model, trained = str(folder / "model.pt"), "reused"
        else:
            config = TrainConfig(architecture="GeometryRegressor",
                                 arch_kwargs={"width": args.width, "coordinates": coordinates},
                                 preprocess=Preprocess(scale="log1p"), steps=args.steps,
                                 learning_rate=args.learning_rate, seed=args.seed)
            model = train_regressor(ds.chunk({"frame": 500}), list(TARGETS), str(folder), config,
                                    progress=_progress)["model"]
            trained = f"{time.perf_counter() - t0:.0f}"
        for variant, test in tests.items():
            net, refined, summary = evaluate(model, test, name in to_refine)
            print(row(name, variant, net, trained), flush=True)
            if refined is not None:
                print(row(f"{name} → ring refinement", variant, refined, summary), flush=True)

    if args.bright:
        # Without a network: how far the rings alone carry from the nominal geometry, at the
        # test set's photon level and with brighter rings (a thicker jet, a longer exposure).
        bright = {**crystal, "water_photons": 20.0 * args.bright, "plastic_photons": 5.0 * args.bright}
        sets = {"standard": tests["standard"],
                f"standard, rings ×{args.bright:g}": stored_set(work / f"test_bright{args.bright:g}.zarr",
                                                             args.test_frames, "standard", 23, bright)}
        with dd.connect(n_workers=2, threads_per_worker=1):
            for variant, test in sets.items():
                refined, summary = refinement(test, None)
                print(row("nominal start → ring refinement", variant, refined, summary), flush=True)

    sizes = [int(n) for n in args.run_frames.split(",") if n]
    if sizes:
        # A run whose detector never moves: every frame shares one centre, tilt and distance.
        fixed_geometry = dd.Geometry((128, 128), 400e-6, 0.06, 1e-10, RUN_CENTER)
        path = work / f"run_fixed{max(sizes)}.zarr"
        if not path.exists():
            dd.save_frames(simulate_bragg(max(sizes), fixed_geometry, beam_center_jitter_px=0, tilt_deg=RUN_TILT,
                                          distance_m=RUN_DISTANCE, seed=31, chunks=250, **crystal),
                           str(path), batch_frames=250)
        run = dd.open_frames(str(path))
        truth = np.array([*RUN_CENTER, *RUN_TILT])
        with dd.connect(n_workers=2, threads_per_worker=1):
            for n in sizes:
                t0 = time.perf_counter()
                fit = dd.refine_run_geometry(run.isel(frame=slice(0, n)).persist(), RINGS,
                                             exclude_radius_px=BEAMSTOP_PX + 2)
                seconds = time.perf_counter() - t0
                err = np.abs(np.array([float(fit[t]) for t in TARGETS]) - truth)
                m = {"center_px": float(np.hypot(err[0], err[1])), "center_y_px": err[0], "center_x_px": err[1],
                     "pitch_deg": err[2], "yaw_deg": err[3]}
                note = (f"σ centre {float(fit['beam_center_y_error']):.3f} px, σ tilt "
                        f"{float(fit['pitch_deg_error']):.4f}°, distance {float(fit['distance_m']) * 100:.3f} ± "
                        f"{float(fit['distance_m_error']) * 100:.3f} cm, {int(fit['iterations'])} steps, {seconds:.0f} s")
                print(row(f"one detector, {n} frames → shared ring refinement", "fixed", m, note), flush=True)


if __name__ == "__main__":
    main()

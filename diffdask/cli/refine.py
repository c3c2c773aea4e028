"""The ``refine`` command: detector geometry per frame from background rings."""

from __future__ import annotations

import json

import click
import numpy as np
from rich.table import Table

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    overwrite_result_option,
    run_with_progress,
    scheduler_option,
    workers_option,
)


def _ring(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        q0, width = (float(v) for v in parts)
    except ValueError:
        raise click.BadParameter(f"a ring is Q,SIGMA in nm⁻¹ (e.g. 19.6,2.2 for water), got {text!r}.") from None
    return q0, width


@main.command(name="refine")
@click.argument("store")
@click.option("--ring", "rings", multiple=True, required=True, metavar="Q,SIGMA",
              help="A background ring: centre and Gaussian width in q, nm⁻¹ (repeat for each ring).")
@click.option("--start", "start_group", default=None,
              help="Result group with per-frame starting values (a `predict` group of a geometry regressor; "
                   "--shared starts from their median); default: the nominal geometry.")
@click.option("--exclude-radius", type=float, default=0.0, show_default=True,
              help="Leave out pixels within this radius (pixels) of each starting centre (beamstop).")
@click.option("--polarization", type=click.Choice(["x", "y", "none"]), default="x", show_default=True)
@click.option("--fixed-distance", is_flag=True, help="Keep each frame's starting distance.")
@click.option("--shared", is_flag=True,
              help="One geometry for the whole run (the detector did not move), fitted to every frame's rings; "
                   "printed (and written with --json), not saved per frame.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="With --shared: write the geometry and its errors to this JSON file.")
@click.option("--group", default="refine", show_default=True, help="Result group: results/GROUP.")
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
def refine_command(store: str, rings: tuple[str, ...], start_group: str | None, exclude_radius: float,
                   polarization: str, fixed_distance: bool, shared: bool, json_path: str | None, group: str,
                   overwrite: bool, scheduler: str | None, workers: int | None) -> None:
    """Refine the beam centre, tilt and distance of STORE's frames from their background rings."""

    from diffdask.io import open_frames, open_results, save_results
    from diffdask.refine import GEOMETRY_FIELDS, refine_geometry, refine_run_geometry

    if json_path and not shared:
        raise click.BadParameter("--json writes the one geometry of --shared; per-frame results go to "
                                 "results/GROUP.", param_hint="--json")
    initial = None
    if start_group:
        found = open_results(store, start_group)
        initial = found.get("predictions", found)
    if shared:
        if initial is not None:
            # One start for the run: the median of the per-frame starting values.
            names = [str(n) for n in (initial["output"].values if "output" in initial.dims else initial.data_vars)]
            initial = {n: float(np.nanmedian((initial.sel(output=n) if "output" in initial.dims else initial[n])
                                             .values)) for n in names if n in GEOMETRY_FIELDS}
        with cluster_client(scheduler, workers):
            fit = refine_run_geometry(open_frames(store), [_ring(r) for r in rings], initial, polarization=polarization,
                                      fit_distance=not fixed_distance, exclude_radius_px=exclude_radius,
                                      progress=lambda i, v: console.print(f"step {i}: " + ", ".join(
                                          f"{k} {x:.6g}" for k, x in v.items()), highlight=False))
        values = {k: float(fit[k]) for k in fit.data_vars}
        table = Table(title=f"diffdask refine --shared {store} ({values['n_frames']:.0f} frames)", show_header=False)
        for name in GEOMETRY_FIELDS:
            table.add_row(name, f"{values[name]:.6g} ± {values[name + '_error']:.2g}")
        table.add_row("reduced χ²", f"{values['chi2_reduced']:.3f}")
        console.print(table)
        if json_path:
            with open(json_path, "w") as f:
                json.dump(values, f, indent=2)
        return
    out = refine_geometry(open_frames(store), [_ring(r) for r in rings], initial, polarization=polarization,
                          fit_distance=not fixed_distance, exclude_radius_px=exclude_radius)
    with cluster_client(scheduler, workers) as client:
        run_with_progress(client, save_results(out, store, group, overwrite=overwrite, compute=False))
    result = open_results(store, group)
    refined = result["refined"].values
    line = f"wrote results/{group}: {int(refined.sum())} of {refined.size} frames refined"
    if refined.any():
        tilt = np.median(result[["pitch_deg_error", "yaw_deg_error"]].to_array().values[:, refined])
        centre = np.median(result[["beam_center_y_error", "beam_center_x_error"]].to_array().values[:, refined])
        line += f", median standard error {centre:.3g} px (centre), {tilt:.3g}° (tilt)"
    console.print(line, highlight=False)

"""The ``reduce`` command: per-frame summaries (CoM, PSD, hits) into ``results/summary``."""

from __future__ import annotations

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


def _parts(what: str) -> tuple[str, ...]:
    from diffdask.reduce.summary import PARTS

    parts = tuple(p.strip() for p in what.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise click.BadParameter(f"expected a comma-separated subset of {','.join(PARTS)}, got {what!r}")
    return parts


@main.command()
@click.argument("store")
@click.option("--what", default="com,radial,hits", show_default=True, help="Results to compute: com, radial, hits.")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="Lit pixel: value > this (frame units).")
@click.option("--min-lit", type=int, default=20, show_default=True, help="Lit pixels that make a hit.")
@click.option("--bin-width", type=float, default=1.0, show_default=True, help="Radial bin width, pixels.")
@click.option("--group", default="summary", show_default=True, help="Result group: written to results/GROUP.")
@click.option("--figure", type=click.Path(dir_okay=False), default=None, help="Also save a PNG overview here.")
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
def reduce(
    store: str,
    what: str,
    threshold: float,
    min_lit: int,
    bin_width: float,
    group: str,
    figure: str | None,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Per-frame reductions of STORE in one pass (CoM, radial PSD, lit-pixel hits), saved beside the frames."""
    from diffdask.io import open_frames, open_results, save_results
    from diffdask.reduce import psd_contrast, summarize

    parts = _parts(what)
    ds = open_frames(store)
    hits = "hits" in parts
    result = summarize(
        ds,
        threshold=threshold if hits else None,
        min_lit=min_lit if hits else None,
        bin_width_px=bin_width,
        include=parts,
    )
    job = save_results(result, store, group, overwrite=overwrite, compute=False)
    with cluster_client(scheduler, workers) as client:
        run_with_progress(client, job)
        saved = open_results(store, group).compute()
    table = Table(title=f"diffdask reduce {store} → results/{group}", show_header=False)
    table.add_row("frames", str(saved.sizes["frame"]))
    if "total" in saved:
        total = saved["total"].values
        table.add_row("total per frame", f"mean {np.mean(total):.4g}, median {np.median(total):.4g}")
        cy, cx = saved["com_y"].values, saved["com_x"].values
        table.add_row(
            "centre of mass (row, col)",
            f"({np.nanmean(cy):.2f} ± {np.nanstd(cy):.2f}, {np.nanmean(cx):.2f} ± {np.nanstd(cx):.2f}) px; "
            f"{int(np.isnan(cy).sum())} empty frames",
        )
    if "radial_profile" in saved:
        gamma = float(psd_contrast(saved["radial_profile"].mean("frame")))
        contrast = f"contrast γ = {gamma:.3f}" if np.isfinite(gamma) else "fewer than 3 fringes (no contrast γ)"
        table.add_row("mean PSD", f"{saved.sizes['radius']} bins of {bin_width} px; {contrast}")
    if "is_hit" in saved:
        n_hits = int(saved["is_hit"].values.sum())
        table.add_row(
            "hits",
            f"{n_hits} of {saved.sizes['frame']} ({n_hits / max(1, saved.sizes['frame']):.1%}) "
            f"with ≥ {min_lit} pixels > {threshold}",
        )
    console.print(table)
    if figure:
        from diffdask.viz import plot_summary

        plot_summary(saved, figure, frames=ds)
        console.print(f"figure: {figure}", highlight=False)

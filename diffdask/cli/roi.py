"""The ``roi`` command: the ptychography region of interest into ``results/roi``."""

from __future__ import annotations

import click
from rich.table import Table

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    overwrite_result_option,
    run_with_progress,
    scheduler_option,
    seed_option,
    workers_option,
)


@main.command()
@click.argument("store")
@click.option("--border", type=int, default=0, show_default=True,
              help="Grow (positive) or shrink (negative) the region by this many scan steps.")
@click.option("--filter-size", type=int, default=3, show_default=True, help="Mean-filter window, scan steps (odd).")
@click.option("--n-init", type=int, default=10, show_default=True, help="k-means restarts.")
@seed_option
@click.option("--group", default="roi", show_default=True, help="Result group: written to results/GROUP.")
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="Save the CoM quiver, the two maps and the region here (PNG, PDF...).")
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
def roi(
    store: str,
    border: int,
    filter_size: int,
    n_init: int,
    seed: int,
    group: str,
    figure: str | None,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Ptychography region of interest of STORE from absorption and CoM maps (writes in_roi)."""
    from diffdask.io import open_frames, save_results
    from diffdask.roi import find_roi, grow_roi

    ds = open_frames(store)
    lazy = find_roi(ds, filter_size=filter_size, n_init=n_init, seed=seed)
    if border:
        lazy = grow_roi(lazy, border)
    with cluster_client(scheduler, workers) as client:
        # One pass over the frames; the maps are a few numbers per frame, so they come back.
        result = run_with_progress(client, lazy)
        per_frame = result.drop_vars([n for n, v in result.data_vars.items() if v.dims != ("frame",)])
        run_with_progress(client, save_results(per_frame, store, group, overwrite=overwrite, compute=False))
    n, total = int(result["n_in_roi"]), result.sizes["frame"]
    table = Table(title=f"diffdask roi {store} → results/{group}", show_header=False)
    table.add_row("scan positions", f"{total} ({int(result['empty'].sum())} empty)")
    table.add_row("low-transmission cluster", str(int(result["in_absorption"].sum())))
    table.add_row("high-CoM cluster", str(int(result["in_com"].sum())))
    table.add_row("region of interest", f"{n} ({n / total:.1%}), border {border:+d} steps")
    console.print(table)
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        from diffdask.viz import plot_roi

        plot_roi(result, figure)
        console.print(f"figure: {figure}", highlight=False)

"""Latent-space commands: ``latent`` (fit, sort single hits) and ``explore`` (the Bokeh explorer)."""

from __future__ import annotations

import sys

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
from diffdask.errors import StoreExistsError


@main.command()
@click.argument("store")
@click.option("--components", "n_components", type=int, default=3, show_default=True, help="Latent dimension.")
@click.option("--contamination", type=float, default=None,
              help="Expected fraction of frames that are not single hits, in (0, 0.5]; default 1 − --single-fraction, "
                   "else the store's simulated single-hit fraction, else 0.1.")
@click.option("--single-fraction", type=float, default=None, help="Expected fraction of single hits (sets the default contamination).")
@click.option("--method", type=click.Choice(["incremental", "randomized"]), default="incremental", show_default=True)
@click.option("--crop", type=int, default=None, help="Side in pixels of the square kept around the beam centre.")
@click.option("--downsample", type=click.Choice(["none", "bin", "fourier"]), default="none", show_default=True)
@click.option("--factor", type=int, default=1, show_default=True, help="Downsampling factor per axis.")
@click.option("--intensity", type=click.Choice(["none", "sqrt", "log"]), default="none", show_default=True)
@click.option("--latent-only", is_flag=True, help="Envelope on the latent coordinates alone (no log residual).")
@seed_option
@click.option("--group", default="latent", show_default=True, help="Result group: written to results/GROUP.")
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
def latent(
    store: str,
    n_components: int,
    contamination: float | None,
    single_fraction: float | None,
    method: str,
    crop: int | None,
    downsample: str,
    factor: int,
    intensity: str,
    latent_only: bool,
    seed: int,
    group: str,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Latent space (PCA) of STORE and single-hit flags; writes latent, residual, single_hit, outlier_score
    and the model to results/GROUP."""
    from diffdask.io import list_results, open_frames, open_results, save_results
    from diffdask.latent import (
        check_contamination,
        explained_variance_summary,
        sort_single_hits,
    )
    from diffdask.metrics import classification_report

    if contamination is not None:
        check_contamination(contamination)
    ds = open_frames(store)
    if not overwrite and group in list_results(store):
        raise StoreExistsError(
            f"{store} already holds results/{group}; pass --overwrite to replace it or --group to write elsewhere."
        )
    with cluster_client(scheduler, workers) as client:
        model, result = sort_single_hits(
            ds, n_components, contamination, use_residual=not latent_only,
            expected_single_fraction=single_fraction, seed=seed, method=method, crop=crop,
            downsample=downsample, factor=factor, intensity=intensity,
        )
        run_with_progress(client, save_results(result, store, group, overwrite=overwrite, compute=False))
        saved = open_results(store, group)[["single_hit", "outlier_score"]].compute()
    flags = saved["single_hit"].values
    outl = result.attrs["outliers"]
    table = Table(title=f"diffdask latent {store} → results/{group}", show_header=False)
    table.add_row("frames", str(flags.size))
    table.add_row("latent space", explained_variance_summary(model))
    table.add_row("envelope", f"{outl['features']}, contamination {outl['contamination']:.4g}, "
                  f"threshold d² = {outl['threshold']:.4g}")
    table.add_row("single hits", f"{int(flags.sum())} of {flags.size} ({flags.mean():.1%})")
    if "single_hit" in ds and ds["single_hit"].dtype == bool:
        # A simulated store carries the truth: show how well the flags match it.
        r = classification_report(ds["single_hit"].values, flags, -saved["outlier_score"].values)
        table.add_row("vs ground truth", f"singles kept {r['tpr']:.2%}, multiple hits kept {r['fpr']:.2%}, "
                      f"F1 {r['f1']:.4f}, ROC AUC {r['roc_auc']:.4f}")
    console.print(table)


@main.command()
@click.argument("store")
@click.option("--port", type=int, default=5006, show_default=True, help="TCP port of the Bokeh server (0: any).")
@click.option("--address", default="localhost", show_default=True, help="Interface to listen on.")
@click.option("--group", default="latent", show_default=True, help="Result group of the latent coordinates.")
@click.option("--max-points", type=int, default=20_000, show_default=True, help="Pickable points drawn.")
@click.option("--hexbin-from", type=int, default=100_000, show_default=True,
              help="Frame count from which a density of all frames is drawn under the points.")
@click.option("--allow-origin", multiple=True, metavar="HOST[:PORT]",
              help="Host a remote browser uses to reach the server (repeatable; with --address 0.0.0.0).")
@click.option("--show/--no-show", default=False, show_default=True, help="Open a browser tab.")
@fail_clearly
def explore(store: str, port: int, address: str, group: str, max_points: int, hexbin_from: int,
            allow_origin: tuple[str, ...], show: bool) -> None:
    """Latent-space explorer of STORE in the browser (Bokeh server; Ctrl-C stops it)."""
    from diffdask.viz.explorer import serve_explorer

    def started(url: str) -> None:
        # Flushed at once: scripts (and the browser test) read the URL from a pipe.
        click.echo(f"diffdask explorer: {url}")
        sys.stdout.flush()

    serve_explorer(store, port=port, address=address, show=show, on_start=started, group=group,
                   max_points=max_points, hexbin_from=hexbin_from, allow_websocket_origin=list(allow_origin) or None)

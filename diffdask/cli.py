"""The ``diffdask`` command: parses arguments, connects to a cluster, calls the library."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from diffdask.errors import DiffdaskError, StoreExistsError

console = Console()


def _fail_clearly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Show diffdask errors as one clear line and exit status 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DiffdaskError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(2)

    return wrapper


scheduler_option = click.option(
    "--scheduler",
    metavar="ADDRESS",
    default=None,
    help="Dask scheduler address or scheduler-file path; default: $DIFFDASK_SCHEDULER, else a local cluster.",
)
workers_option = click.option(
    "--workers", type=int, default=None, help="Worker processes of the local cluster (default: one per core)."
)


@contextmanager
def _client(scheduler: str | None, workers: int | None) -> Any:
    from diffdask.cluster import connect

    if scheduler and (scheduler.endswith(".json")):
        client = connect(scheduler_file=scheduler)
    else:
        client = connect(address=scheduler, n_workers=workers)
    try:
        console.print(f"Dask dashboard: {client.dashboard_link}", highlight=False)
        yield client
    finally:
        client.close()


def run_with_progress(client: Any, job: Any) -> Any:
    """Compute a lazy job on ``client`` with a progress bar; return its result."""
    from distributed import progress

    future = client.compute(job)
    # distributed.progress draws in a terminal or notebook; dask.diagnostics.ProgressBar
    # would print nothing under a distributed client.
    progress(future)
    print(file=sys.stderr)
    return future.result()


@click.group()
@click.version_option(package_name="diffdask")
def main() -> None:
    """diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""


@main.command()
@click.argument("src")
@click.argument("store")
@click.option("--dataset", default="entry_1/data_1/data", show_default=True, help="HDF5 path of the frames.")
@click.option("--mask", "mask_path", default=None, help="HDF5 path of a mask dataset (0 = good); default: CXI mask.")
@click.option(
    "--per-frame",
    "per_frame",
    multiple=True,
    metavar="NAME=PATH",
    help="Carry an HDF5 dataset with one entry per frame as variable NAME (repeatable).",
)
@click.option("--batch-frames", type=int, default=None, help="Frames per batch/shard (default ≈ 96 MiB).")
@click.option("--overwrite", is_flag=True, help="Replace a store that holds other data.")
@scheduler_option
@workers_option
@_fail_clearly
def ingest(
    src: str,
    store: str,
    dataset: str,
    mask_path: str | None,
    per_frame: tuple[str, ...],
    batch_frames: int | None,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Stream the frames of an HDF5/CXI file SRC into the Zarr store STORE (resumable)."""
    from diffdask.io import ingest_hdf5, store_info

    variables = {}
    for item in per_frame:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {item!r}", param_hint="--per-frame")
        variables[name] = path
    job = ingest_hdf5(
        src,
        store,
        dataset,
        mask=mask_path,
        per_frame=variables,
        batch_frames=batch_frames,
        overwrite=overwrite,
        compute=False,
    )
    with _client(scheduler, workers) as client:
        meta = run_with_progress(client, job)
    info = store_info(store)
    console.print(
        f"ingested {info['n_frames']} frames {info['frame_shape']} {info['dtype']} into {store} "
        f"(compression {info['compression_ratio']:.1f}×)",
        highlight=False,
    )
    if meta.get("n_nonfinite_pixels"):
        console.print(
            f"[yellow]warning:[/] {meta['n_nonfinite_pixels']} NaN/inf pixels; they are treated as masked."
        )


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_fail_clearly
def info(store: str, as_json: bool) -> None:
    """Describe the frame-stack store STORE (reads metadata only)."""
    from diffdask.io import store_info

    meta = store_info(store)
    if as_json:
        click.echo(json.dumps(meta, indent=2, default=str))
        return
    table = Table(title=f"diffdask store {meta['url']}", show_header=False)
    table.add_row("frames", f"{meta['n_frames']} × {meta['frame_shape'][0]} × {meta['frame_shape'][1]} {meta['dtype']}")
    table.add_row(
        "chunks", f"{meta['batch_frames']} frames per shard / Dask chunk, {meta['inner_frames']} per inner chunk"
    )
    table.add_row("codecs", ", ".join(meta["codecs"]))
    table.add_row(
        "size",
        f"{_format_bytes(meta['nbytes'])} raw, {_format_bytes(meta['stored_bytes'])} stored "
        f"(compression {meta['compression_ratio']:.2f}×)",
    )
    table.add_row("complete", "yes" if meta["complete"] else "[red]no: re-run the job that wrote it[/]")
    if meta["n_nonfinite_pixels"]:
        table.add_row("NaN/inf pixels", f"{meta['n_nonfinite_pixels']} (treated as masked)")
    table.add_row("mask", "yes" if meta["has_mask"] else "none (all pixels good)")
    g = meta["geometry"]
    if g:
        table.add_row(
            "geometry",
            f"λ = {g['wavelength_m'] * 1e10:.4g} Å, distance = {g['distance_m'] * 1e3:.4g} mm, "
            f"pixel = {g['pixel_size_m']} m, beam centre (y, x) = {tuple(round(c, 2) for c in g['beam_center_yx'])} px",
        )
    else:
        table.add_row("geometry", "none")
    per_frame = ", ".join(f"{k} {tuple(v['dims'])} {v['dtype']}" for k, v in meta["per_frame"].items())
    table.add_row("per-frame variables", per_frame or "none")
    table.add_row("results", ", ".join(meta["results"]) or "none")
    console.print(table)


def _jsonable(attrs: Any) -> Any:
    return json.loads(json.dumps(dict(attrs), default=str, sort_keys=True))


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
@click.option("--overwrite", is_flag=True, help="Replace an existing result group of that name.")
@scheduler_option
@workers_option
@_fail_clearly
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
    from diffdask.io import list_results, open_frames, open_results, save_results
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
    if not overwrite and group in list_results(store):
        # save_results resumes a group of the same layout; parameters are not part of the
        # layout, so refuse here rather than keep results made with other parameters.
        old = open_results(store, group).attrs
        if _jsonable(old) != _jsonable(result.attrs):
            raise StoreExistsError(
                f"{store} already holds results/{group} made with other parameters "
                f"({_jsonable(old)}); pass --overwrite to replace them or --group to write elsewhere."
            )
    job = save_results(result, store, group, overwrite=overwrite, compute=False)
    with _client(scheduler, workers) as client:
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
        gamma = psd_contrast(saved["radial_profile"].mean("frame"))
        table.add_row("mean PSD", f"{saved.sizes['radius']} bins of {bin_width} px; contrast γ = {float(gamma):.3f}")
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


if __name__ == "__main__":
    main()

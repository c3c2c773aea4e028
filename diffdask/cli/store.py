"""Store commands: ``ingest`` (HDF5/CXI → Zarr) and ``info`` (what a store holds, ``--verify``)."""

from __future__ import annotations

import json
import sys

import click
from rich.table import Table

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    overwrite_store_option,
    run_with_progress,
    scheduler_option,
    workers_option,
)


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
@overwrite_store_option
@scheduler_option
@workers_option
@fail_clearly
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
    with cluster_client(scheduler, workers) as client:
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
@click.option("--verify", is_flag=True, help="Also read every shard and report missing or corrupt ones (exit 1).")
@scheduler_option
@workers_option
@fail_clearly
def info(store: str, as_json: bool, verify: bool, scheduler: str | None, workers: int | None) -> None:
    """Describe the frame-stack store STORE (reads metadata only; --verify reads every shard)."""
    from diffdask.io import store_info, verify_store

    meta = store_info(store)
    if verify:
        with cluster_client(scheduler, workers, quiet=as_json):
            checks = verify_store(store)
        bad = [c for c in checks if c["status"] != "ok"]
        if as_json:
            click.echo(json.dumps({**meta, "verify": checks}, indent=2, default=str))
        else:
            table = Table(title=f"shards of {meta['url']}")
            for column in ("shard", "frames", "status"):
                table.add_column(column)
            for c in checks:
                colour = "green" if c["status"] == "ok" else "red"
                table.add_row(str(c["batch"]), f"{c['frames'][0]}–{c['frames'][1]}", f"[{colour}]{c['status']}[/]")
            console.print(table)
            console.print(
                f"{len(checks) - len(bad)} of {len(checks)} shards ok"
                + ("" if not bad else "; re-copy the store or re-ingest the frames listed above."),
                highlight=False,
            )
        if bad:
            sys.exit(1)
        return
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

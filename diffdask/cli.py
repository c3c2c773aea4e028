"""The ``diffdask`` command: parses arguments, connects to a cluster, calls the library."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from diffdask._version import __version__
from diffdask.errors import DiffdaskError, StoreExistsError

console = Console()
#: Messages that must not mix into machine-readable output on stdout.
err_console = Console(stderr=True)
#: Seconds the command line waits for a remote scheduler.
CONNECT_TIMEOUT_S = 5.0


def _fail_clearly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Show diffdask errors as one clear line and exit status 2, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(click.get_current_context().find_root().params.get("debug"))
        try:
            return func(*args, **kwargs)
        except DiffdaskError as exc:
            if debug:
                raise
            console.print(f"[bold red]error:[/] {exc}", highlight=False)
            sys.exit(2)
        except (click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # a library's own error: one line here, the traceback with --debug
            if debug:
                raise
            console.print(
                f"[bold red]error:[/] {type(exc).__name__}: {exc} (run `diffdask --debug ...` for the traceback)",
                highlight=False,
            )
            sys.exit(1)

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
def _client(scheduler: str | None, workers: int | None, quiet: bool = False) -> Any:
    from diffdask.cluster import connect

    # A few seconds is plenty for a reachable scheduler; a wrong address must fail fast, not hang.
    if scheduler and (scheduler.endswith(".json")):
        client = connect(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_S)
    else:
        client = connect(address=scheduler, n_workers=workers, timeout=CONNECT_TIMEOUT_S)
    try:
        (err_console if quiet else console).print(f"Dask dashboard: {client.dashboard_link}", highlight=False)
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
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """diffdask: Dask-distributed analysis of X-ray diffraction frame stacks."""
    # Advice meant for library authors (scatter large arguments); nothing a CLI user can act on.
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)


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
@click.option("--verify", is_flag=True, help="Also read every shard and report missing or corrupt ones (exit 1).")
@scheduler_option
@workers_option
@_fail_clearly
def info(store: str, as_json: bool, verify: bool, scheduler: str | None, workers: int | None) -> None:
    """Describe the frame-stack store STORE (reads metadata only; --verify reads every shard)."""
    from diffdask.io import store_info, verify_store

    meta = store_info(store)
    if verify:
        with _client(scheduler, workers, quiet=as_json):
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


def _iteration_printer(n_runs: int) -> Callable[[Any], None]:
    def show(it: Any) -> None:
        ll = ", ".join(f"{v:.6e}" for v in it.log_likelihood)
        rms = ", ".join(f"{v:.4e}" for v in it.rms_change)
        console.print(
            f"iteration {it.iteration:3d}  log-likelihood {ll}  rms change {rms}  "
            f"β {it.beta_mean:.6f}  {it.time_s:.2f} s",
            highlight=False,
        )

    return show


@main.command()
@click.argument("store", required=False)
@click.option("--photons", type=click.Path(), help="Dragonfly sparse photons file (.emc) instead of STORE.")
@click.option("--detector", type=click.Path(), help="Dragonfly HDF5 detector file (with --photons).")
@click.option("--classes", "n_classes", type=int, required=True, help="Number of class models K.")
@click.option("--rotations", "n_rotations", type=int, required=True, help="In-plane rotations J.")
@click.option("--iterations", type=int, default=10, show_default=True)
@click.option("--start-model", type=click.Path(), help="Dragonfly output_000.h5 (intens) to start from.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random start models.")
@click.option("--friedel", is_flag=True, help="Symmetrise models under q → −q.")
@click.option("--no-scaling", is_flag=True, help="Do not model per-frame fluence scales.")
@click.option("--beta", type=float, default=None, help="Fixed starting β (default: per-frame, Dragonfly's rule).")
@click.option("--beta-schedule", nargs=2, type=(float, int), default=(2**0.5, 5), show_default=True)
@click.option("--save-probabilities", is_flag=True, help="Keep sparse probabilities (Dragonfly layout only).")
@click.option("--out", type=click.Path(), help="Directory for Dragonfly-layout output_NNN.h5 files.")
@scheduler_option
@workers_option
@_fail_clearly
def emc2d(
    store: str | None,
    photons: str | None,
    detector: str | None,
    n_classes: int,
    n_rotations: int,
    iterations: int,
    start_model: str | None,
    seed: int,
    friedel: bool,
    no_scaling: bool,
    beta: float | None,
    beta_schedule: tuple[float, int],
    save_probabilities: bool,
    out: str | None,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """2D EMC classification with in-plane rotations.

    Either Dragonfly files (--photons, --detector; outputs to --out as output_NNN.h5) or a
    diffdask STORE (each iteration saved in the store as results/emc2d/iter_NNN, and in --out
    when given).
    """
    from diffdask.emc import EMC2D
    from diffdask.io import open_frames, save_results
    from diffdask.io.dragonfly import read_emc, read_emc_output

    if (store is None) == (photons is None):
        raise click.UsageError("give either a STORE or --photons with --detector")
    if photons is not None and detector is None:
        raise click.UsageError("--photons needs --detector")
    ds = open_frames(store) if store else read_emc(photons, detector)
    start = read_emc_output(start_model)["intens"] if start_model else None
    emc = EMC2D(n_classes, n_rotations, friedel=friedel, need_scaling=not no_scaling, beta=beta,
                beta_schedule=beta_schedule, keep_probabilities=save_probabilities)
    show = _iteration_printer(1)

    def each(it: Any) -> None:
        show(it)
        if store:
            save_results(it.to_dataset(0), store, f"emc2d/iter_{it.iteration:03d}", overwrite=True)

    with _client(scheduler, workers):
        result = emc.run(ds, iterations, start_models=start, seed=seed, callback=each)
    if out:
        paths = result.write_dragonfly(out)
        console.print(f"wrote {len(paths)} Dragonfly outputs to {out}", highlight=False)


@main.command(name="bootstrap")
@click.argument("store")
@click.option("--runs", "n_runs", type=int, default=5, show_default=True)
@click.option("--fraction", type=float, default=0.8, show_default=True)
@click.option("--classes", "n_classes", type=int, default=200, show_default=True)
@click.option("--rotations", "n_rotations", type=int, default=36, show_default=True)
@click.option("--iterations", type=int, default=20, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Zarr store for the class averages.")
@click.option("--overwrite", is_flag=True)
@scheduler_option
@workers_option
@_fail_clearly
def bootstrap_command(
    store: str,
    n_runs: int,
    fraction: float,
    n_classes: int,
    n_rotations: int,
    iterations: int,
    seed: int,
    out: str,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Bootstrapped 2D EMC on STORE; writes the runs × classes averages as a frame stack to --out."""
    from diffdask.emc import bootstrap
    from diffdask.io import open_frames, save_frames

    ds = open_frames(store)
    with _client(scheduler, workers):
        result = bootstrap(ds, n_runs=n_runs, fraction=fraction, n_classes=n_classes, n_rotations=n_rotations,
                           iterations=iterations, seed=seed, callback=_iteration_printer(n_runs))
        save_frames(result.averages(), out, overwrite=overwrite)
    console.print(f"wrote {n_runs} × {n_classes} class averages to {out}", highlight=False)


# ---------------------------------------------------------------------- simulate
def _floats(text: str, name: str) -> float | tuple[float, float]:
    """"70" → 70.0, "55,84" → (55.0, 84.0)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"expected a number or LOW,HIGH, got {text!r}", param_hint=name) from None
    if len(values) not in (1, 2):
        raise click.BadParameter(f"expected a number or LOW,HIGH, got {text!r}", param_hint=name)
    return values[0] if len(values) == 1 else values  # type: ignore[return-value]


def _simulation_options(shape: int, pixel_m: float, distance_m: float, wavelength_m: float) -> Callable[[Any], Any]:
    """Options every simulator takes, with detector defaults suited to the technique."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        options = [
            click.argument("store"),
            click.option("--n-frames", type=int, required=True, help="Number of frames to simulate."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random choice."),
            click.option("--shape", type=int, default=shape, show_default=True, help="Detector side, pixels (square)."),
            click.option("--pixel-size", "pixel_m", type=float, default=pixel_m, show_default=True, help="Pixel pitch, m."),
            click.option("--distance", "distance_m", type=float, default=distance_m, show_default=True, help="Detector distance, m."),
            click.option("--wavelength", "wavelength_m", type=float, default=wavelength_m, show_default=True, help="Wavelength, m."),
            click.option("--no-noise", is_flag=True, help="Store expected photons instead of Poisson counts."),
            click.option("--batch-frames", type=int, default=None, help="Frames per chunk/shard (default ≈ 96 MiB)."),
            click.option("--overwrite", is_flag=True, help="Replace a store that holds other data."),
            scheduler_option,
            workers_option,
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def _write_simulation(ds: Any, store: str, batch_frames: int | None, overwrite: bool, scheduler: str | None, workers: int | None) -> None:
    from diffdask.io import save_frames

    job = save_frames(ds, store, overwrite=overwrite, batch_frames=batch_frames, compute=False)
    with _client(scheduler, workers) as client:
        run_with_progress(client, job)
    console.print(
        f"simulated {ds.sizes['frame']} {ds.attrs['simulation']['simulator']} frames "
        f"{tuple(ds.frames.shape[1:])} into {store}",
        highlight=False,
    )


@main.group()
def simulate() -> None:
    """Write simulated frame stacks with ground-truth labels (seeded, resumable)."""


@simulate.command("spi")
@_simulation_options(shape=128, pixel_m=600e-6, distance_m=0.3, wavelength_m=6e-10)
@click.option("--particle", "shape_name", default="sphere", show_default=True,
              help="sphere, ellipsoid, cube, superellipsoid, icosahedral_shell or pdb.")
@click.option("--diameter", default="55,84", show_default=True, help="Diameter in nm, or LOW,HIGH for a uniform range.")
@click.option("--exponent", type=float, default=2.0, show_default=True, help="Superellipsoid exponent p.")
@click.option("--pdb", "pdb_path", default=None, help="PDB file of a pdb particle.")
@click.option("--single-hit-fraction", type=float, default=1.0, show_default=True, help="Fraction of single hits.")
@click.option("--fluence", type=float, default=1e24, show_default=True, help="Fluence, photons/m².")
@click.option("--background", type=float, default=0.0, show_default=True, help="Background photons per pixel.")
@click.option("--gap-px", type=int, default=4, show_default=True, help="Panel gap width, pixels.")
@click.option("--beamstop-px", type=float, default=4.0, show_default=True, help="Beamstop radius, pixels.")
@click.option("--method", default="auto", show_default=True, help="auto, exact or slicing.")
@_fail_clearly
def simulate_spi_command(store: str, n_frames: int, seed: int, shape: int, pixel_m: float, distance_m: float,
                         wavelength_m: float, no_noise: bool, batch_frames: int | None, overwrite: bool,
                         scheduler: str | None, workers: int | None, shape_name: str, diameter: str,
                         exponent: float, pdb_path: str | None, single_hit_fraction: float, fluence: float,
                         background: float, gap_px: int, beamstop_px: float, method: str) -> None:
    """Single-particle imaging frames (single and multiple hits) into STORE."""
    from diffdask.geometry import Geometry
    from diffdask.simulate import Particle, detector_mask, simulate_spi

    geometry = Geometry((shape, shape), pixel_m, distance_m, wavelength_m)
    particle = Particle(shape_name, None if shape_name == "pdb" else _floats(diameter, "--diameter"),
                        exponent=exponent, pdb_path=pdb_path)
    ds = simulate_spi(n_frames, geometry, particle, single_hit_fraction=single_hit_fraction,
                      fluence_photons_per_m2=fluence, background_photons=background,
                      mask=detector_mask(geometry, gap_px=gap_px, beamstop_radius_px=beamstop_px),
                      noise=not no_noise, method=method, seed=seed, chunks=batch_frames)
    _write_simulation(ds, store, batch_frames, overwrite, scheduler, workers)


@simulate.command("ptycho")
@_simulation_options(shape=128, pixel_m=75e-6, distance_m=2.0, wavelength_m=1.409e-10)
@click.option("--probe", default="airy", show_default=True, help="airy, gaussian or aperture.")
@click.option("--probe-diameter", type=float, default=1e-6, show_default=True, help="Probe size, m.")
@click.option("--overlap", type=float, default=0.7, show_default=True, help="Linear probe overlap in [0, 1).")
@click.option("--scan", default="raster", show_default=True, help="raster or fly.")
@click.option("--photons", type=float, default=1e6, show_default=True, help="Photons per frame.")
@_fail_clearly
def simulate_ptycho_command(store: str, n_frames: int, seed: int, shape: int, pixel_m: float, distance_m: float,
                            wavelength_m: float, no_noise: bool, batch_frames: int | None, overwrite: bool,
                            scheduler: str | None, workers: int | None, probe: str, probe_diameter: float,
                            overlap: float, scan: str, photons: float) -> None:
    """Ptychography scan frames with positions and region-of-interest labels into STORE."""
    from diffdask.geometry import Geometry
    from diffdask.simulate import simulate_ptycho

    geometry = Geometry((shape, shape), pixel_m, distance_m, wavelength_m)
    ds = simulate_ptycho(n_frames, geometry, probe=probe, probe_diameter_m=probe_diameter, overlap=overlap,
                         scan=scan, photons_per_frame=photons, noise=not no_noise, seed=seed, chunks=batch_frames)
    _write_simulation(ds, store, batch_frames, overwrite, scheduler, workers)


@simulate.command("bragg")
@_simulation_options(shape=256, pixel_m=344e-6, distance_m=0.15, wavelength_m=1e-10)
@click.option("--variant", default="standard", show_default=True, help="standard, flat or binary.")
@click.option("--cell", "cell_lengths", default="4,10", show_default=True, help="Cell lengths, nm (LOW,HIGH).")
@click.option("--max-tilt", type=float, default=3.0, show_default=True, help="Largest pitch/yaw, degrees.")
@click.option("--center-jitter", type=float, default=10.0, show_default=True, help="Beam-centre jitter, pixels.")
@_fail_clearly
def simulate_bragg_command(store: str, n_frames: int, seed: int, shape: int, pixel_m: float, distance_m: float,
                           wavelength_m: float, no_noise: bool, batch_frames: int | None, overwrite: bool,
                           scheduler: str | None, workers: int | None, variant: str, cell_lengths: str,
                           max_tilt: float, center_jitter: float) -> None:
    """Crystallography still images with beam-centre, tilt and distance labels into STORE."""
    from diffdask.geometry import Geometry
    from diffdask.simulate import simulate_bragg

    geometry = Geometry((shape, shape), pixel_m, distance_m, wavelength_m)
    ds = simulate_bragg(n_frames, geometry, cell_lengths_nm=_floats(cell_lengths, "--cell"), variant=variant,
                        max_tilt_deg=max_tilt, beam_center_jitter_px=center_jitter, noise=not no_noise,
                        seed=seed, chunks=batch_frames)
    _write_simulation(ds, store, batch_frames, overwrite, scheduler, workers)


@main.group()
def train() -> None:
    """Train neural networks on labelled frame stacks."""


@train.command(name="hits")
@click.argument("store")
@click.option("--label", default="single_hit", show_default=True, help="Boolean per-frame label (True = positive).")
@click.option("--out", type=click.Path(), required=True, help="Directory for the k-fold ensemble.")
@click.option("--steps", type=int, default=2000, show_default=True, help="Optimisation steps per fold.")
@click.option("--folds", type=int, default=5, show_default=True, help="k of the k-fold ensemble.")
@click.option("--more-sh", is_flag=True, help="High-recall variant: 5 % positives and class weights 0.9/0.1.")
@click.option("--crop", nargs=2, type=int, default=(192, 96), show_default=True, help="Input patch (h w) around the beam.")
@click.option("--width", type=int, default=16, show_default=True, help="Filters of the first stage (the paper: 16).")
@click.option("--seed", type=int, default=0, show_default=True)
@scheduler_option
@workers_option
@_fail_clearly
def train_hits(store: str, label: str, out: str, steps: int, folds: int, more_sh: bool, crop: tuple[int, int],
               width: int, seed: int, scheduler: str | None, workers: int | None) -> None:
    """Train the single-hit classifier ensemble (Assalauova et al. 2022) on STORE's LABEL."""
    from rich.progress import Progress

    from diffdask.io import open_frames
    from diffdask.ml.preprocess import Preprocess
    from diffdask.ml.train import TrainConfig, train_classifier

    config = TrainConfig(arch_kwargs={"width": width}, preprocess=Preprocess(crop=crop), steps=steps, k_folds=folds,
                         seed=seed, positive_fraction=0.05 if more_sh else 0.02,
                         class_weights=(0.9, 0.1) if more_sh else None)
    with _client(scheduler, workers), Progress(console=console) as bar:
        task = bar.add_task("training", total=steps * folds)
        result = train_classifier(open_frames(store), label, out, config,
                                  progress=lambda step, total, loss: bar.update(task, advance=1,
                                                                                description=f"loss {loss:.4f}"))
    for fold in result.folds:
        console.print(f"fold {fold['fold']}: precision {fold['precision']:.3f} recall {fold['recall']:.3f} "
                      f"F1 {fold['f1']:.3f}", highlight=False)
    console.print(f"ensemble of {len(result.models)} models in {out}", highlight=False)


@train.command(name="geometry")
@click.argument("store")
@click.option("--out", type=click.Path(), required=True)
@click.option("--targets", default="beam_center_y,beam_center_x,pitch_deg,yaw_deg", show_default=True)
@click.option("--steps", type=int, default=3000, show_default=True)
@click.option("--width", type=int, default=64, show_default=True, help="Filters of the first stage (ResNet-18: 64).")
@click.option("--learning-rate", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@scheduler_option
@workers_option
@_fail_clearly
def train_geometry(store: str, out: str, targets: str, steps: int, width: int, learning_rate: float, seed: int,
                   scheduler: str | None, workers: int | None) -> None:
    """Train the beam-centre / tilt regressor on STORE's per-frame targets."""
    from diffdask.io import open_frames
    from diffdask.ml.preprocess import Preprocess
    from diffdask.ml.train import TrainConfig, train_regressor

    config = TrainConfig(architecture="GeometryRegressor", arch_kwargs={"width": width},
                         preprocess=Preprocess(scale="log1p"), steps=steps, learning_rate=learning_rate, seed=seed)
    with _client(scheduler, workers):
        result = train_regressor(open_frames(store), [t.strip() for t in targets.split(",")], out, config)
    for name, mae in result["mae"].items():
        console.print(f"{name}: mean absolute error {mae:.4g} on held-out frames", highlight=False)


@main.command(name="predict")
@click.argument("store")
@click.option("--model", "model_dir", type=click.Path(), required=True,
              help="A model .pt file, or a directory of an ensemble (fold_*/model.pt).")
@click.option("--mirror", is_flag=True, help="Test-time mirroring (classifiers).")
@click.option("--group", default="predict", show_default=True, help="Result group: results/GROUP.")
@click.option("--overwrite", is_flag=True)
@scheduler_option
@workers_option
@_fail_clearly
def predict_command(store: str, model_dir: str, mirror: bool, group: str, overwrite: bool, scheduler: str | None,
                    workers: int | None) -> None:
    """Run a trained model (or ensemble) over every frame of STORE; save the outputs beside the frames."""
    from pathlib import Path

    from diffdask.io import open_frames, save_results
    from diffdask.ml import predict
    from diffdask.ml.train import ensemble_paths

    paths = ensemble_paths(model_dir) if Path(model_dir).is_dir() else [model_dir]
    with _client(scheduler, workers) as client:
        out = predict(open_frames(store), paths, mirror=mirror)
        run_with_progress(client, save_results(out, store, group, overwrite=overwrite, compute=False))
    console.print(f"wrote results/{group} ({', '.join(map(str, out.output.values))}) for {out.sizes['frame']} frames",
                  highlight=False)


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
@click.option("--overwrite", is_flag=True)
@scheduler_option
@workers_option
@_fail_clearly
def refine_command(store: str, rings: tuple[str, ...], start_group: str | None, exclude_radius: float,
                   polarization: str, fixed_distance: bool, shared: bool, json_path: str | None, group: str,
                   overwrite: bool, scheduler: str | None, workers: int | None) -> None:
    """Refine the beam centre, tilt and distance of STORE's frames from their background rings."""
    import numpy as np

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
        with _client(scheduler, workers):
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
    with _client(scheduler, workers) as client:
        run_with_progress(client, save_results(out, store, group, overwrite=overwrite, compute=False))
    result = open_results(store, group)
    refined = result["refined"].values
    line = f"wrote results/{group}: {int(refined.sum())} of {refined.size} frames refined"
    if refined.any():
        tilt = np.median(result[["pitch_deg_error", "yaw_deg_error"]].to_array().values[:, refined])
        centre = np.median(result[["beam_center_y_error", "beam_center_x_error"]].to_array().values[:, refined])
        line += f", median standard error {centre:.3g} px (centre), {tilt:.3g}° (tilt)"
    console.print(line, highlight=False)


@main.command(name="run")
@click.argument("pipeline_file", metavar="PIPELINE.yaml")
@scheduler_option
@workers_option
@_fail_clearly
def run_command(pipeline_file: str, scheduler: str | None, workers: int | None) -> None:
    """Run a declared pipeline over many inputs; re-running skips what is done.

    Exit status 1 when some input failed (the others are processed and reported).
    """
    from diffdask.pipeline import load_pipeline, run_pipeline

    pipeline = load_pipeline(pipeline_file)
    total = len(pipeline.inputs) * len(pipeline.steps)
    console.print(f"{len(pipeline.inputs)} inputs × {len(pipeline.steps)} steps", highlight=False)
    seen = []

    def show(entry: Any) -> None:
        seen.append(entry)
        colour = {"done": "green", "skipped": "cyan", "failed": "red", "not run": "yellow"}[entry.status]
        console.print(
            f"[{len(seen)}/{total}] {entry.source} · {entry.step}: [{colour}]{entry.status}[/] {entry.message}",
            highlight=False,
        )

    with _client(scheduler, workers):
        report = run_pipeline(pipeline, on_step=show)
    table = Table(title="pipeline summary")
    for column in ("input", "step", "status", "seconds", "result"):
        table.add_column(column)
    for entry in report.steps:
        table.add_row(entry.source, entry.step, entry.status, f"{entry.seconds:.1f}", entry.message)
    console.print(table)
    if report.failed_inputs:
        console.print(f"[red]{len(report.failed_inputs)} input(s) failed[/]: {', '.join(report.failed_inputs)}")
        sys.exit(1)


@main.command()
@click.argument("store")
@click.option("--angles", "n_angles", type=int, default=180, show_default=True, help="Line angles over [0, π).")
@click.option("--mask-radius", type=float, default=20, show_default=True, help="Inner radius left out, pixels.")
@click.option(
    "--interp", type=click.Choice(["nearest", "bilinear"]), default="nearest", show_default=True,
    help="Interpolation of the line samples.",
)
@click.option("--components", type=int, default=3, show_default=True, help="Dimensions of the CLPCA space.")
@click.option("--block-size", type=int, default=None, help="Averages per tile side (default ≈ 32 MiB of lines).")
@click.option("--color-by", default=None, metavar="VAR", help="Per-frame variable that colours the figure.")
@click.option("--figure", default=None, metavar="PNG", help="Figure path (default: STORE's name + -clpca.png).")
@click.option(
    "--absolute", default=None, metavar="PT",
    help="Also train the absolute embedding and save it here (weights + JSON sidecar).",
)
@click.option("--epochs", type=int, default=300, show_default=True, help="Training passes of --absolute.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier results/commonlines.")
@scheduler_option
@workers_option
@_fail_clearly
def commonlines(
    store: str,
    n_angles: int,
    mask_radius: float,
    interp: str,
    components: int,
    block_size: int | None,
    color_by: str | None,
    figure: str | None,
    absolute: str | None,
    epochs: int,
    overwrite: bool,
    scheduler: str | None,
    workers: int | None,
) -> None:
    """Common-line CC matrix and CLPCA space of the averages in STORE.

    The frames of STORE are the class averages (its mask, if any, gives the masked Pearson
    correlation). Writes results/commonlines (cc, clpca) into STORE and a PNG of the space.
    """
    from pathlib import Path

    import dask.array as da
    import numpy as np
    import xarray as xr

    from diffdask.commonlines import AbsoluteEmbedding, cc_matrix, clpca
    from diffdask.errors import ParameterError
    from diffdask.io import open_frames, save_results
    from diffdask.viz import plot_landscape

    ds = open_frames(store)
    if color_by is not None and (color_by not in ds.variables or ds[color_by].dims[:1] != ("frame",)):
        labels = sorted(str(n) for n, v in ds.data_vars.items() if v.dims[:1] == ("frame",) and n != "frames")
        raise ParameterError(f"--color-by {color_by!r} is not a per-frame variable of {store}; it has {labels}.")
    cc = cc_matrix(ds, n_angles, mask_radius, interp, block_size=block_size)
    with _client(scheduler, workers) as client:
        matrix = run_with_progress(client, cc)
        space = clpca(matrix, components)
        params = {
            "n_angles": n_angles, "mask_radius": mask_radius, "interp": interp,
            "explained_variance_ratio": space.explained_variance_ratio.tolist(), "diffdask_version": __version__,
        }
        result = xr.Dataset(
            {
                "cc": (("frame", "frame_j"), da.from_array(matrix, chunks=(len(matrix), -1))),
                "clpca": (("frame", "component"), space.coordinates),
            },
            attrs=params,
        )
        save_results(result, store, "commonlines", overwrite=overwrite)
        if absolute is not None:
            model = AbsoluteEmbedding(mask_radius=mask_radius, epochs=epochs).fit(ds, space.coordinates)
            model.save(absolute)
            console.print(
                f"absolute embedding saved to {absolute}; validation MSE per component "
                f"{np.round(model.validation_mse_, 4).tolist()}",
                highlight=False,
            )
    png = Path(figure) if figure else Path(str(store).rstrip("/")).with_name(Path(str(store).rstrip("/")).stem + "-clpca.png")
    color = None if color_by is None else np.asarray(ds[color_by].values)
    plot_landscape(space.coordinates, png, color, color_by or "", space.explained_variance_ratio)
    console.print(
        f"CC matrix of {len(matrix)} averages ({n_angles} angles, mask radius {mask_radius:g} px) and "
        f"{components}-D CLPCA space (explained variance "
        f"{', '.join(f'{100 * v:.1f} %' for v in space.explained_variance_ratio)}) written to "
        f"{store}/results/commonlines; figure {png}",
        highlight=False,
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



# ---------------------------------------------------------------------- latent space
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
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--group", default="latent", show_default=True, help="Result group: written to results/GROUP.")
@click.option("--overwrite", is_flag=True, help="Replace an existing result group of that name.")
@scheduler_option
@workers_option
@_fail_clearly
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
    with _client(scheduler, workers) as client:
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
@_fail_clearly
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


@main.command()
@click.argument("store")
@click.option("--border", type=int, default=0, show_default=True,
              help="Grow (positive) or shrink (negative) the region by this many scan steps.")
@click.option("--filter-size", type=int, default=3, show_default=True, help="Mean-filter window, scan steps (odd).")
@click.option("--n-init", type=int, default=10, show_default=True, help="k-means restarts.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the k-means starts.")
@click.option("--group", default="roi", show_default=True, help="Result group: written to results/GROUP.")
@click.option("--figure", type=click.Path(dir_okay=False), default=None,
              help="Save the CoM quiver, the two maps and the region here (PNG, PDF...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing result group of that name.")
@scheduler_option
@workers_option
@_fail_clearly
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
    with _client(scheduler, workers) as client:
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


if __name__ == "__main__":
    main()

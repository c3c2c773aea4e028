"""EMC commands: ``emc2d`` (2D EMC from a store or Dragonfly files) and ``bootstrap``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from diffdask.cli._common import (
    cluster_client,
    console,
    fail_clearly,
    main,
    overwrite_store_option,
    scheduler_option,
    seed_option,
    workers_option,
)


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
@seed_option
@click.option("--friedel", is_flag=True, help="Symmetrise models under q → −q.")
@click.option("--no-scaling", is_flag=True, help="Do not model per-frame fluence scales.")
@click.option("--beta", type=float, default=None, help="Fixed starting β (default: per-frame, Dragonfly's rule).")
@click.option("--beta-schedule", nargs=2, type=(float, int), default=(2**0.5, 5), show_default=True)
@click.option("--save-probabilities", is_flag=True, help="Keep sparse probabilities (Dragonfly layout only).")
@click.option("--out", type=click.Path(), help="Directory for Dragonfly-layout output_NNN.h5 files.")
@scheduler_option
@workers_option
@fail_clearly
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

    with cluster_client(scheduler, workers):
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
@seed_option
@click.option("--out", type=click.Path(), required=True, help="Zarr store for the class averages.")
@overwrite_store_option
@scheduler_option
@workers_option
@fail_clearly
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
    with cluster_client(scheduler, workers):
        result = bootstrap(ds, n_runs=n_runs, fraction=fraction, n_classes=n_classes, n_rotations=n_rotations,
                           iterations=iterations, seed=seed, callback=_iteration_printer(n_runs))
        save_frames(result.averages(), out, overwrite=overwrite)
    console.print(f"wrote {n_runs} × {n_classes} class averages to {out}", highlight=False)

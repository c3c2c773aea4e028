"""The ``simulate`` group: ``spi``, ``ptycho`` and ``bragg`` frame stacks with ground truth."""

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
    run_with_progress,
    scheduler_option,
    seed_option,
    workers_option,
)


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
            seed_option,
            click.option("--shape", type=int, default=shape, show_default=True, help="Detector side, pixels (square)."),
            click.option("--pixel-size", "pixel_m", type=float, default=pixel_m, show_default=True, help="Pixel pitch, m."),
            click.option("--distance", "distance_m", type=float, default=distance_m, show_default=True, help="Detector distance, m."),
            click.option("--wavelength", "wavelength_m", type=float, default=wavelength_m, show_default=True, help="Wavelength, m."),
            click.option("--no-noise", is_flag=True, help="Store expected photons instead of Poisson counts."),
            click.option("--batch-frames", type=int, default=None, help="Frames per chunk/shard (default ≈ 96 MiB)."),
            overwrite_store_option,
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
    with cluster_client(scheduler, workers) as client:
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
@fail_clearly
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
@fail_clearly
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
@fail_clearly
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

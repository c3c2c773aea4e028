"""The ``commonlines`` command: the blocked CC matrix, CLPCA and the absolute landscape."""

from __future__ import annotations

import click
import numpy as np

from diffdask._version import __version__
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
@overwrite_result_option
@scheduler_option
@workers_option
@fail_clearly
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
    with cluster_client(scheduler, workers) as client:
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

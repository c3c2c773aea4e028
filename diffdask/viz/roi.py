"""Figures of a ptychography region of interest (`diffdask.find_roi` results)."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from diffdask.errors import ParameterError, SchemaError
from diffdask.roi import scan_grid

#: Most arrows a quiver plot draws; denser scans are thinned (every k-th position).
MAX_ARROWS = 4000
_UM = 1e6


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _is_raster(result: xr.Dataset) -> bool:
    gy, gx = result["grid_y"].values, result["grid_x"].values
    return bool(np.all(gy == np.rint(gy)) and np.all(gx == np.rint(gx)))


def _check(result: Any, needed: tuple[str, ...]) -> xr.Dataset:
    if not isinstance(result, xr.Dataset):
        raise SchemaError(f"expected the Dataset from diffdask.scan_maps or find_roi, got {type(result).__name__}.")
    missing = [n for n in needed if n not in result]
    if missing:
        raise SchemaError(f"the result has no {', '.join(missing)}; make it with diffdask.find_roi.")
    return result.compute()


def _new_axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    _, ax = _pyplot().subplots(figsize=(5, 4.5))
    return ax


def _label(ax: Any, title: str) -> None:
    ax.set(title=title, xlabel="scan x (µm)", ylabel="scan y (µm)", aspect="equal")


def _map(ax: Any, result: xr.Dataset, name: str, label: str, **style: Any) -> Any:
    """A per-frame variable as an image on a raster, else as dots at the scan positions."""
    if _is_raster(result):
        image = scan_grid(result, name)
        y, x = image["y_m"].values * _UM, image["x_m"].values * _UM
        # Pixel edges half a step beyond the first and last row/column centres.
        half_y = (y[-1] - y[0]) / max(len(y) - 1, 1) / 2
        half_x = (x[-1] - x[0]) / max(len(x) - 1, 1) / 2
        extent = (x[0] - half_x, x[-1] + half_x, y[0] - half_y, y[-1] + half_y)
        artist = ax.imshow(np.asarray(image.values, dtype=float), origin="lower", extent=extent,
                           interpolation="nearest", **style)
    else:
        artist = ax.scatter(result["scan_x"].values * _UM, result["scan_y"].values * _UM,
                            c=np.asarray(result[name].values, dtype=float), s=8, **style)
    ax.figure.colorbar(artist, ax=ax, label=label)
    return artist


def plot_com_quiver(result: xr.Dataset, ax: Any = None) -> Any:
    """Quiver plot of the centre-of-mass vectors at the scan positions (the paper's Fig. 2b).

    Parameters
    ----------
    result : xarray.Dataset
        Output of `diffdask.scan_maps` or `diffdask.find_roi`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes

    Notes
    -----
    Arrows are the CoM minus its mean over the scan (pixels; y along detector rows), coloured
    by the standardised magnitude; scans with more than `MAX_ARROWS` positions are thinned.
    """
    result = _check(result, ("scan_y", "scan_x", "com_dy", "com_dx", "com_magnitude"))
    ax = _new_axes(ax)
    ok = np.flatnonzero(np.isfinite(result["com_dx"].values))
    ok = ok[:: max(1, -(-len(ok) // MAX_ARROWS))]
    q = ax.quiver(
        result["scan_x"].values[ok] * _UM,
        result["scan_y"].values[ok] * _UM,
        result["com_dx"].values[ok],
        result["com_dy"].values[ok],
        result["com_magnitude"].values[ok],
        angles="xy",
        cmap="viridis",
    )
    ax.figure.colorbar(q, ax=ax, label="|standardised CoM|")
    _label(ax, "centre-of-mass vectors")
    return ax


def plot_roi_maps(result: xr.Dataset, axes: Any = None) -> Any:
    """The two filtered log maps that k-means splits: absorption (ln T) and CoM magnitude.

    Parameters
    ----------
    result : xarray.Dataset
        Output of `diffdask.find_roi`.
    axes : pair of matplotlib.axes.Axes, optional
        Where to draw the absorption and CoM maps; a new figure when omitted.

    Returns
    -------
    pair of matplotlib.axes.Axes
    """
    result = _check(result, ("absorption_map", "com_map", "grid_y", "grid_x"))
    if axes is None:
        _, axes = _pyplot().subplots(1, 2, figsize=(10, 4.5))
    ax_abs, ax_com = axes
    _map(ax_abs, result, "absorption_map", "ln mean-filtered total", cmap="gray")
    _label(ax_abs, "absorption contrast")
    _map(ax_com, result, "com_map", "ln mean-filtered |CoM|", cmap="magma")
    _label(ax_com, "CoM magnitude")
    return axes


def plot_roi_selection(result: xr.Dataset, ax: Any = None) -> Any:
    """The region of interest: absorption cluster, CoM cluster and their union (Fig. 4c).

    Parameters
    ----------
    result : xarray.Dataset
        Output of `diffdask.find_roi` or `diffdask.grow_roi`.
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes
    """
    result = _check(result, ("in_roi", "in_absorption", "in_com", "scan_y", "scan_x"))
    ax = _new_axes(ax)
    y, x = result["scan_y"].values * _UM, result["scan_x"].values * _UM
    a, c, roi = (result[n].values.astype(bool) for n in ("in_absorption", "in_com", "in_roi"))
    # The union before any border change: a grown region also holds positions of neither.
    groups = [
        (~roi, "lightgray", "outside"),
        (roi & a & ~c, "tab:blue", "absorption only"),
        (roi & c & ~a, "tab:orange", "CoM only"),
        (roi & a & c, "tab:green", "both"),
        (roi & ~a & ~c, "tab:purple", "border growth"),
    ]
    for members, colour, label in groups:
        if members.any():
            ax.scatter(x[members], y[members], s=6, color=colour, label=f"{label} ({int(members.sum())})")
    n = int(roi.sum())
    border = result.attrs.get("border_steps", 0)
    _label(ax, f"region of interest: {n} of {roi.size} ({n / roi.size:.0%}), border {border:+d}")
    ax.legend(loc="upper right", fontsize="small", markerscale=2)
    return ax


def plot_roi(result: xr.Dataset, path: Any = None, dpi: int = 120) -> Any:
    """Overview of a region of interest: CoM quiver, the two maps and the selection.

    Parameters
    ----------
    result : xarray.Dataset
        Output of `diffdask.find_roi` (or `diffdask.grow_roi`); loaded if lazy.
    path : str or os.PathLike, optional
        Save the figure here (PNG, PDF... from the suffix) and close it.
    dpi : int
        Resolution of a saved raster image.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if dpi < 1:
        raise ParameterError(f"dpi must be positive, got {dpi}.")
    result = _check(result, ("in_roi", "absorption_map", "com_map", "com_dx"))
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 9.5))
    plot_com_quiver(result, axes[0, 0])
    plot_roi_maps(result, (axes[0, 1], axes[1, 0]))
    plot_roi_selection(result, axes[1, 1])
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig

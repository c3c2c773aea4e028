"""Overview figure of the per-frame reductions (`diffdask.summarize` results)."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from diffdask.errors import SchemaError


def plot_summary(results: xr.Dataset, path: Any, frames: xr.Dataset | None = None, dpi: int = 120) -> None:
    """Save a PNG overview of `summarize` results.

    Panels: for a scan (``scan_y``/``scan_x`` in ``frames``) maps of the total intensity and
    of the centre-of-mass shift at the scan positions, otherwise histograms of the totals and
    of the centre-of-mass positions; the mean PSD against q (or radius) on a log scale; the
    histogram of lit pixels per frame with the hit rate.

    Parameters
    ----------
    results : xarray.Dataset
        Computed or lazy output of `diffdask.summarize` (any of its parts).
    path : str or os.PathLike
        Output PNG file.
    frames : xarray.Dataset, optional
        The frame stack, for scan positions.
    dpi : int
        Resolution of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(results, xr.Dataset):
        raise SchemaError(f"plot_summary takes the Dataset from diffdask.summarize, got {type(results).__name__}.")
    results = results.compute()
    panels = []
    if "total" in results:
        panels += ["total", "com"]
    if "radial_profile" in results:
        panels.append("psd")
    if "lit_pixels" in results:
        panels.append("lit")
    if not panels:
        raise SchemaError("the results hold none of total, radial_profile, lit_pixels: nothing to plot.")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    scan = frames is not None and "scan_y" in frames and "scan_x" in frames
    for ax, panel in zip(axes[0], panels):
        if panel == "total" and scan:
            sc = ax.scatter(frames["scan_x"].values, frames["scan_y"].values, c=results["total"].values, s=8)
            fig.colorbar(sc, ax=ax, label="total")
            ax.set(title="total intensity", xlabel="scan x", ylabel="scan y", aspect="equal")
        elif panel == "total":
            ax.hist(results["total"].values[np.isfinite(results["total"].values)], bins=50)
            ax.set(title="total intensity per frame", xlabel="total", ylabel="frames")
        elif panel == "com" and scan:
            cy, cx = results["com_y"].values, results["com_x"].values
            shift = np.hypot(cy - np.nanmean(cy), cx - np.nanmean(cx))
            sc = ax.scatter(frames["scan_x"].values, frames["scan_y"].values, c=shift, s=8)
            fig.colorbar(sc, ax=ax, label="|CoM − mean| (px)")
            ax.set(title="centre-of-mass shift", xlabel="scan x", ylabel="scan y", aspect="equal")
        elif panel == "com":
            ok = np.isfinite(results["com_y"].values)
            ax.hist2d(results["com_x"].values[ok], results["com_y"].values[ok], bins=40)
            ax.set(title="centre of mass", xlabel="column (px)", ylabel="row (px)")
        elif panel == "psd":
            prof = results["radial_profile"].mean("frame")
            if "q_inv_nm" in prof.coords:
                x, label = prof["q_inv_nm"].values, "q (nm⁻¹)"
            else:
                x, label = prof["radius_px"].values, "radius (px)"
            y = prof.values
            ok = np.isfinite(y) & (y > 0)
            ax.semilogy(x[ok], y[ok])
            ax.set(title="mean PSD", xlabel=label, ylabel="mean intensity per pixel")
        else:
            lit = results["lit_pixels"].values
            ax.hist(lit, bins=50)
            title = "lit pixels per frame"
            if "is_hit" in results:
                title += f" (hit rate {float(results['is_hit'].values.mean()):.1%})"
                min_lit = results.attrs.get("min_lit")
                if min_lit is not None:
                    ax.axvline(min_lit, color="C3", ls="--", label=f"min_lit = {min_lit}")
                    ax.legend()
            ax.set(title=title, xlabel="lit pixels", ylabel="frames")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

"""Figure of a structural landscape (CLPCA space) coloured by a per-average label."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffdask.errors import ParameterError

#: Labels with at most this many distinct values are drawn as categories with a legend.
MAX_CATEGORIES = 12


def plot_landscape(
    coordinates: Any,
    path: str | Path,
    color: Any = None,
    color_name: str = "",
    explained: Any = None,
    title: str = "CLPCA space",
) -> Path:
    """Scatter CLPCA-1 against CLPCA-2 (and CLPCA-3) and write a PNG.

    Parameters
    ----------
    coordinates : array_like, shape (M, k)
        Landscape coordinates (k ≥ 2).
    path : str or Path
        Output PNG.
    color : array_like, shape (M,), optional
        A per-average label (class, run...) or value; few distinct values get a legend,
        many a colour bar.
    color_name : str
        Name of the label, for the legend or colour bar.
    explained : array_like, shape (k,), optional
        Explained variance ratios, shown in the axis labels.
    title : str
        Figure title.

    Returns
    -------
    Path
        The PNG written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.asarray(coordinates, dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ParameterError(f"coordinates must be (M, k ≥ 2), got shape {xy.shape}.")
    pairs = [(0, 1)] + ([(0, 2)] if xy.shape[1] > 2 else [])
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4.8), squeeze=False)

    def axis_label(k: int) -> str:
        share = f" ({100 * float(explained[k]):.1f} %)" if explained is not None else ""
        return f"CLPCA-{k + 1}{share}"

    values = None if color is None else np.asarray(color)
    if values is not None and values.shape != (len(xy),):
        raise ParameterError(f"color must have one value per average ({len(xy)}), got shape {values.shape}.")
    categories = values is not None and (values.dtype.kind not in "fc" or len(np.unique(values)) <= MAX_CATEGORIES)
    for ax, (a, b) in zip(axes[0], pairs):
        if values is None:
            ax.scatter(xy[:, a], xy[:, b], s=8, alpha=0.7)
        elif categories:
            for value in np.unique(values):
                sel = values == value
                ax.scatter(xy[sel, a], xy[sel, b], s=8, alpha=0.7, label=str(value))
            ax.legend(title=color_name or None, fontsize="small", markerscale=2)
        else:
            points = ax.scatter(xy[:, a], xy[:, b], s=8, alpha=0.7, c=values, cmap="viridis")
            fig.colorbar(points, ax=ax, label=color_name)
        ax.set_xlabel(axis_label(a))
        ax.set_ylabel(axis_label(b))
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

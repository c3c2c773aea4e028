"""Figures (matplotlib) and the Bokeh latent-space explorer (the ``viz`` extra); algorithms
never import this package."""

from diffdask.viz.explorer import explorer_app, serve_explorer
from diffdask.viz.landscape import plot_landscape
from diffdask.viz.reduce import plot_summary
from diffdask.viz.roi import (
    plot_com_quiver,
    plot_roi,
    plot_roi_maps,
    plot_roi_selection,
)

__all__ = [
    "explorer_app",
    "plot_com_quiver",
    "plot_landscape",
    "plot_roi",
    "plot_roi_maps",
    "plot_roi_selection",
    "plot_summary",
    "serve_explorer",
]

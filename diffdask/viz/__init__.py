"""Figures (matplotlib) and the Bokeh latent-space explorer (the ``viz`` extra); algorithms
never import this package."""

from diffdask.viz.explorer import explorer_app, serve_explorer
from diffdask.viz.landscape import plot_landscape
from diffdask.viz.reduce import plot_summary

__all__ = ["explorer_app", "plot_landscape", "plot_summary", "serve_explorer"]

"""Figures (matplotlib, from the ``viz`` extra); algorithms never import this package."""

from diffdask.viz.landscape import plot_landscape

__all__ = ["plot_landscape"]

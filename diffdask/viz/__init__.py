"""Figures (matplotlib, from the ``viz`` extra); algorithms never import this package."""

from diffdask.viz.landscape import plot_landscape
from diffdask.viz.reduce import plot_summary

__all__ = ["plot_landscape", "plot_summary"]

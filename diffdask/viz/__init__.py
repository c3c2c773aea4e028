"""Figures (matplotlib, from the ``viz`` extra); algorithms never import this package."""

from diffdask.viz.reduce import plot_summary

__all__ = ["plot_summary"]

"""Common lines of 2-D class averages: the blocked CC matrix, CLPCA landscape, absolute embedding."""

from diffdask.commonlines.absolute import (
    AbsoluteEmbedding,
    feature_grid,
    rotation_invariant_features,
)
from diffdask.commonlines.ccmatrix import cc_matrix
from diffdask.commonlines.landscape import CLPCA, clpca, embed
from diffdask.commonlines.lines import LineGrid, line_grid, line_samples

__all__ = [
    "CLPCA",
    "AbsoluteEmbedding",
    "LineGrid",
    "cc_matrix",
    "clpca",
    "embed",
    "feature_grid",
    "line_grid",
    "line_samples",
    "rotation_invariant_features",
]

"""Common lines of 2-D class averages: the blocked CC matrix, CLPCA landscape, absolute embedding."""

from diffdask.commonlines.ccmatrix import cc_matrix
from diffdask.commonlines.lines import LineGrid, line_grid, line_samples

__all__ = ["LineGrid", "cc_matrix", "line_grid", "line_samples"]

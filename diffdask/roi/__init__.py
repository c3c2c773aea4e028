"""Ptychography region of interest from absorption and centre-of-mass maps (Lin et al.).

Before an expensive reconstruction, keep only the diffraction patterns whose scan position
sees the object. Two maps over the scan positions, both read from the frames in one pass:

- absorption contrast: the total counts T^k of each frame, low where the object absorbs;
- scattering: the centre of mass O^k of each frame (eq. 1), standardised over the scan
  (eq. 2) so that its origin is the calibrated beam centre; its magnitude is large where
  phase gradients in the object deflect the beam (edges, internal structure).

Each map is mean-filtered over a filter_size × filter_size neighbourhood of scan positions,
taken on a log scale and split in two by k-means. The region of interest is the union of
the low-transmission cluster and the high-magnitude cluster: absorption finds dense interiors
but misses weakly absorbing parts, the CoM finds edges but misses flat interiors.

Raster scans are detected from ``scan_y``/``scan_x`` and arranged on their grid (rows and
columns of scan steps); irregular positions (fly scans, spirals, large position errors) are
measured in units of the estimated scan step. Either way a neighbourhood is every position
within a Chebyshev distance of half the window plus half a step, so on a raster it is exactly
the square window, and grown or shrunk regions (`grow_roi`) move their border by whole steps.

The same CoM field gives differential phase contrast (`differential_phase`): the deflection
is the phase gradient, integrated to a phase map on a raster.

The per-frame CoM is one lazy pass over the frames (`diffdask.center_of_mass`); everything
after it works on a few numbers per scan position and runs as one task over the whole scan,
so the result does not depend on the chunking of the frames.

Layout: `diffdask.roi.grid` (scan step, raster detection, neighbourhoods),
`diffdask.roi.kernels` (maps, region, growth) and `diffdask.roi.phase` (DPC integration) are
NumPy/SciPy kernels on the whole scan; `diffdask.roi.graph` builds the Dask graphs.
"""

from diffdask.roi.graph import differential_phase, find_roi, grow_roi, scan_grid, scan_maps
from diffdask.roi.grid import GRID_MAX_FILL, GRID_TOLERANCE_STEPS, STEP_NEIGHBOURS
from diffdask.roi.kernels import grow_kernel, maps_kernel, roi_kernel
from diffdask.roi.phase import dpc_kernel, integrate_gradient

__all__ = [
    "GRID_MAX_FILL",
    "GRID_TOLERANCE_STEPS",
    "STEP_NEIGHBOURS",
    "differential_phase",
    "dpc_kernel",
    "find_roi",
    "grow_kernel",
    "grow_roi",
    "integrate_gradient",
    "maps_kernel",
    "roi_kernel",
    "scan_grid",
    "scan_maps",
]

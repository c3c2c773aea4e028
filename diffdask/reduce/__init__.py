"""Per-frame reductions: centre of mass, radial profiles (PSD), azimuthal integration (1-D
and cake), lit pixels and hits, PSD contrast and sphere sizing.

The per-frame reductions share one compiled kernel (`diffdask.reduce.kernel`) that reads each
pixel once and sums in float64 in a fixed order, so `summarize` gets all of them from one
read of the data, with the same bits on any machine and for any chunking.
"""

from diffdask.reduce.com import center_of_mass
from diffdask.reduce.contrast import psd_contrast
from diffdask.reduce.hits import find_hits, lit_pixels
from diffdask.reduce.integrate import integrate1d, integrate2d
from diffdask.reduce.radial import mean_profile, radial_profile
from diffdask.reduce.sizing import fit_sphere_diameter, size_filter, sphere_form_factor
from diffdask.reduce.summary import summarize

__all__ = [
    "center_of_mass",
    "find_hits",
    "fit_sphere_diameter",
    "integrate1d",
    "integrate2d",
    "lit_pixels",
    "mean_profile",
    "psd_contrast",
    "radial_profile",
    "size_filter",
    "sphere_form_factor",
    "summarize",
]

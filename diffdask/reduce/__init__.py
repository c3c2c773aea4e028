"""Per-frame reductions: centre of mass, radial profiles (PSD), lit pixels and hits, PSD
contrast and sphere sizing.

The per-frame reductions share one precomputed linear operator and one fused kernel
(`diffdask.reduce.operator`), so `summarize` gets all of them from one read of the data.
"""

from diffdask.reduce.com import center_of_mass
from diffdask.reduce.contrast import psd_contrast
from diffdask.reduce.hits import find_hits, lit_pixels
from diffdask.reduce.radial import mean_profile, radial_profile
from diffdask.reduce.sizing import fit_sphere_diameter, size_filter, sphere_form_factor
from diffdask.reduce.summary import summarize

__all__ = [
    "center_of_mass",
    "find_hits",
    "fit_sphere_diameter",
    "lit_pixels",
    "mean_profile",
    "psd_contrast",
    "radial_profile",
    "size_filter",
    "sphere_form_factor",
    "summarize",
]

"""Argument validation of the public reductions, fuzzed: every input either works or raises a
`DiffdaskError` that says what is wrong — never a raw exception from NumPy, Dask or numba."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import diffdask as dd
from diffdask.errors import DiffdaskError

pytestmark = pytest.mark.filterwarnings("ignore::diffdask.errors.NonFinitePixelsWarning")

GEOM = dd.Geometry((12, 14), pixel_size_m=75e-6, distance_m=0.1, wavelength_m=1e-10)
STACK = dd.make_frame_stack(
    np.random.default_rng(0).poisson(2.0, (5, 12, 14)).astype(np.float32), geometry=GEOM, chunks=2
)

anything = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.tuples(st.floats(-50, 50), st.floats(-50, 50)),
    st.lists(st.integers(-5, 30), max_size=3), st.just(np.float32(0.5)), st.just(np.int64(3)),
)
CALLS = {
    "radial_profile": lambda a, b, c: dd.radial_profile(STACK, bin_width_px=a, n_bins=b, center=c),
    "summarize": lambda a, b, c: dd.summarize(STACK, threshold=a, min_lit=b, center=c),
    "lit_pixels": lambda a, b, c: dd.lit_pixels(STACK, a),
    "find_hits": lambda a, b, c: dd.find_hits(STACK, a, b),
    "integrate1d": lambda a, b, c: dd.integrate1d(STACK, a, unit=b, radial_range=c),
    "integrate2d": lambda a, b, c: dd.integrate2d(STACK, a, npt_azim=b, azimuth_range=c),
    "mean_profile": lambda a, b, c: dd.mean_profile(STACK, bin_width_px=a, n_bins=b, center=c),
}


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CALLS)), anything, anything, anything)
def test_public_reductions_raise_only_diffdask_errors(name, a, b, c):
    try:
        result = CALLS[name](a, b, c)
    except DiffdaskError as err:
        assert str(err) and not str(err).startswith("<")  # a message, not a repr
        return
    # Accepted: the lazy result is well formed (its shape and dtype are known without computing).
    assert all(math.prod(v.shape) >= 0 for v in getattr(result, "data_vars", {"r": result}).values())

"""The frame-stack schema: what is accepted, what is refused, how NaN/inf are handled."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import diffdask as dd
from diffdask.frames import clean_block


def test_make_frame_stack_builds_a_lazy_frame_chunked_stack(geometry):
    frames = np.arange(10 * 24 * 30, dtype="float32").reshape(10, 24, 30)
    ds = dd.make_frame_stack(frames, geometry=geometry, per_frame={"scan_y": np.arange(10.0)}, chunks=4)
    assert isinstance(ds.frames.data, da.Array)
    assert ds.frames.data.chunks == ((4, 4, 2), (24,), (30,))
    assert dd.get_geometry(ds) == geometry
    assert dd.get_mask(ds).all() and dd.get_mask(ds).shape == (24, 30)
    assert np.array_equal(ds.frames.values, frames)


def _stack(**changes):
    ds = xr.Dataset({"frames": (("frame", "y", "x"), np.zeros((3, 4, 5), "float32"))})
    for k, v in changes.items():
        ds[k] = v
    return ds


@pytest.mark.parametrize(
    "ds, match",
    [
        (xr.Dataset({"data": (("frame", "y", "x"), np.zeros((2, 3, 3)))}), "no 'frames' variable"),
        (xr.Dataset({"frames": (("y", "x"), np.zeros((3, 3)))}), "3-D"),
        (xr.Dataset({"frames": (("t", "row", "col"), np.zeros((2, 3, 3)))}), "rename"),
        (xr.Dataset({"frames": (("frame", "y", "x"), np.array([[["a"]]]))}), "dtype"),
        (xr.Dataset({"frames": (("frame", "y", "x"), np.zeros((2, 3, 3), bool))}), "dtype"),
        (xr.Dataset({"frames": (("frame", "y", "x"), np.zeros((2, 3, 3), complex))}), "dtype"),
        (_stack(mask=(("rows", "cols"), np.ones((4, 6), bool))), "mask"),
        (_stack(mask=(("y", "x"), np.ones((4, 5), "uint8"))), "bool"),
        (_stack(angle=(("k", "frame"), np.zeros((2, 3)))), "first dim"),
    ],
)
def test_validate_refuses_broken_stacks_with_the_fix(ds, match):
    with pytest.raises(dd.SchemaError, match=match):
        dd.validate(ds)


def test_validate_refuses_non_datasets_and_bad_geometry_attrs():
    with pytest.raises(dd.SchemaError, match="xarray.Dataset"):
        dd.validate(np.zeros((2, 3, 3)))
    ds = _stack()
    ds.attrs.update(wavelength_m=1e-10, distance_m=-0.1, pixel_size_m=1e-4)
    with pytest.raises(dd.GeometryError, match="distance_m"):
        dd.validate(ds)
    ds.attrs.update(distance_m=0.1, beam_center_yx=[10.0, 1.0])
    with pytest.raises(dd.GeometryError, match="outside"):
        dd.validate(ds)


def test_make_frame_stack_refuses_bad_arrays(geometry):
    with pytest.raises(dd.SchemaError, match="3-D"):
        dd.make_frame_stack(np.zeros((24, 30)))
    with pytest.raises(dd.SchemaError, match="mask shape"):
        dd.make_frame_stack(np.zeros((2, 24, 30)), mask=np.ones((30, 24), bool))
    with pytest.raises(dd.SchemaError, match="geometry"):
        dd.make_frame_stack(np.zeros((2, 20, 30)), geometry=geometry)
    with pytest.raises(dd.SchemaError, match="one entry per frame"):
        dd.make_frame_stack(np.zeros((2, 24, 30)), per_frame={"label": np.zeros(3)})


def test_nonfinite_pixels_warn_at_the_door_and_are_masked_in_kernels():
    frames = np.ones((2, 3, 4), "float32")
    frames[0, 1, 1] = np.nan
    frames[1, 2, 3] = -np.inf
    frames[1, 0, 0] = -2.5  # negative values are data (dark-subtracted), never masked
    with pytest.warns(dd.NonFinitePixelsWarning, match="2 frame pixels"):
        dd.make_frame_stack(frames)
    mask = np.ones((3, 4), bool)
    mask[0, 2] = False
    values, good = clean_block(frames, mask)
    assert np.isfinite(values).all()
    expected_good = np.isfinite(frames) & mask
    assert np.array_equal(good, expected_good)
    assert values[1, 0, 0] == -2.5 and values[0, 0, 2] == 0 and values[0, 1, 1] == 0
    assert values.sum() == pytest.approx(np.where(expected_good, frames, 0).sum())


def test_lazy_stacks_are_not_read_by_validate():
    def explode(block):
        raise AssertionError("validate read the data")

    lazy = da.zeros((4, 3, 3), chunks=2, dtype="float32").map_blocks(explode, dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dd.make_frame_stack(lazy)


def test_a_mask_that_is_not_bool_or_0_1_is_refused_not_rounded():
    frames = np.ones((2, 3, 4), np.float32)
    with pytest.raises(dd.SchemaError, match=r"bool or 0/1.*0\.5.*weights > 0\.5"):
        dd.make_frame_stack(frames, mask=np.full((3, 4), 0.5))
    with pytest.raises(dd.SchemaError, match="bool or 0/1"):
        dd.make_frame_stack(frames, mask=np.full((3, 4), "yes"))
    ones = dd.make_frame_stack(frames, mask=np.array([[1, 0, 1, 1]] * 3, dtype=np.uint8))
    assert ones.mask.dtype == bool and int(ones.mask.sum()) == 9

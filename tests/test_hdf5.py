"""HDF5/CXI ingest: real HDF5 files, other chunkings, CXI metadata, broken files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

import diffdask as dd
from diffdask.io import ingest_hdf5, open_frames, open_hdf5
from diffdask.io.hdf5 import HC_J_M


def _write_cxi(path: Path, frames: np.ndarray, mask: np.ndarray | None = None, chunks=(7, None, None)) -> None:
    ny, nx = frames.shape[1:]
    with h5py.File(path, "w") as f:
        f.create_dataset("entry_1/data_1/data", data=frames, chunks=(chunks[0], ny, nx), compression="gzip")
        det = f.create_group("entry_1/instrument_1/detector_1")
        if mask is not None:
            det["mask"] = np.where(mask, 0, 1).astype("uint32")
        det["distance"] = 0.25
        det["x_pixel_size"] = 110e-6
        det["y_pixel_size"] = 110e-6
        # first pixel's outer corner at (x, y) = (-(12.5 + 0.5), -(7.25 + 0.5)) pixels from the beam
        det["corner_position"] = [-13.0 * 110e-6, -7.75 * 110e-6, 0.25]
        f["entry_1/instrument_1/source_1/energy"] = 8000 * 1.602176634e-19
        f["entry_1/sample_1/scan_y"] = np.linspace(0, 1e-6, frames.shape[0])


@pytest.fixture
def frames():
    return np.random.default_rng(5).poisson(0.3, size=(61, 16, 26)).astype("uint16")


def test_ingest_with_other_chunking_is_bit_identical_on_a_cluster(client, tmp_path, frames):
    mask = np.ones((16, 26), bool)
    mask[:, 13] = False
    _write_cxi(tmp_path / "run.cxi", frames, mask, chunks=(7,))
    ds = ingest_hdf5(tmp_path / "run.cxi", tmp_path / "run.zarr", batch_frames=12,
                     per_frame={"scan_y": "entry_1/sample_1/scan_y"})
    assert ds.frames.dtype == np.uint16 and np.array_equal(ds.frames.values, frames)
    assert np.array_equal(ds.mask.values, mask)
    assert np.allclose(ds.scan_y.values, np.linspace(0, 1e-6, 61))
    g = dd.get_geometry(ds)
    assert g.distance_m == 0.25 and g.pixel_size_m == 110e-6
    assert g.wavelength_m == pytest.approx(HC_J_M / (8000 * 1.602176634e-19))  # 1.5498 Å
    assert g.wavelength_m == pytest.approx(1.5498e-10, rel=1e-4)
    assert g.beam_center_yx == pytest.approx((7.25, 12.5))
    assert ds.attrs["source"].endswith("run.cxi") and ds.attrs["source_dataset"] == "entry_1/data_1/data"
    assert open_frames(tmp_path / "run.zarr").frames.data.chunks[0][0] == 12


def test_open_hdf5_is_lazy_and_reads_per_chunk(tmp_path, frames):
    _write_cxi(tmp_path / "run.h5", frames)
    ds = open_hdf5(tmp_path / "run.h5", chunks=10)
    assert ds.frames.data.chunks[0] == (10,) * 6 + (1,)
    assert np.array_equal(ds.frames[25:37].values, frames[25:37])
    assert "mask" not in ds  # no CXI mask in this file
    assert np.array_equal(open_frames(tmp_path / "run.h5").frames.values, frames)  # HDF5 opens too


def test_explicit_mask_and_geometry_override_the_file(tmp_path, frames):
    _write_cxi(tmp_path / "run.cxi", frames, np.ones((16, 26), bool))
    g = dd.Geometry((16, 26), 75e-6, 0.1, 1e-10)
    mask = np.zeros((16, 26), bool)
    mask[4:8] = True
    ds = open_hdf5(tmp_path / "run.cxi", mask=mask, geometry=g)
    assert dd.get_geometry(ds) == g and np.array_equal(ds.mask.values, mask)
    with h5py.File(tmp_path / "run.cxi", "a") as f:
        f["bad_pixels"] = (~mask).astype("uint8")
    assert np.array_equal(open_hdf5(tmp_path / "run.cxi", mask="bad_pixels").mask.values, mask)


def test_nonfinite_pixels_in_hdf5_are_kept_counted_and_warned(tmp_path):
    frames = np.ones((8, 4, 5), "float32")
    frames[2, 1, 1] = np.nan
    frames[6, 3, 4] = np.inf
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["entry_1/data_1/data"] = frames
    with pytest.warns(dd.NonFinitePixelsWarning, match="2 frame pixels"):
        ds = ingest_hdf5(tmp_path / "f.h5", tmp_path / "f.zarr", batch_frames=3)
    assert np.array_equal(ds.frames.values, frames, equal_nan=True)


def test_bad_hdf5_inputs_are_clear_errors(tmp_path, frames):
    with pytest.raises(dd.StoreNotFoundError):
        ingest_hdf5(tmp_path / "missing.h5", tmp_path / "out.zarr")
    (tmp_path / "notes.h5").write_text("not hdf5")
    with pytest.raises(dd.StoreFormatError, match="not an HDF5 file"):
        open_hdf5(tmp_path / "notes.h5")
    _write_cxi(tmp_path / "run.cxi", frames)
    with pytest.raises(dd.StoreFormatError, match=r"no dataset 'entry_1/data_1/frames'.*entry_1/data_1/data"):
        open_hdf5(tmp_path / "run.cxi", dataset="entry_1/data_1/frames")
    with pytest.raises(dd.StoreFormatError, match="scan_x"):
        open_hdf5(tmp_path / "run.cxi", per_frame={"scan_x": "entry_1/sample_1/scan_x"})
    with pytest.raises(dd.SchemaError, match="one entry per frame"):
        open_hdf5(tmp_path / "run.cxi", per_frame={"d": "entry_1/instrument_1/detector_1/corner_position"})
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f["image"] = np.zeros((16, 26))
        f["names"] = np.array([[[b"a"]]])
    with pytest.raises(dd.SchemaError, match="3-D"):
        open_hdf5(tmp_path / "flat.h5", dataset="image")
    with pytest.raises(dd.SchemaError, match="not numeric"):
        open_hdf5(tmp_path / "flat.h5", dataset="names")
    with pytest.raises(dd.SchemaError, match="mask shape"):
        open_hdf5(tmp_path / "run.cxi", mask=np.ones((3, 3), bool))


def test_truncated_hdf5_file_is_a_clear_error(tmp_path, frames):
    _write_cxi(tmp_path / "run.cxi", frames)
    data = (tmp_path / "run.cxi").read_bytes()
    (tmp_path / "cut.cxi").write_bytes(data[: len(data) // 2])
    with pytest.raises(dd.StoreFormatError, match="truncated"):
        ingest_hdf5(tmp_path / "cut.cxi", tmp_path / "cut.zarr")
    assert not (tmp_path / "cut.zarr").exists()

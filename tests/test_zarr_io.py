"""Zarr v3 stores: bit-identical round trips, lazy opens, resumable batched writes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from dask.callbacks import Callback

import diffdask as dd
from diffdask.io import (
    list_results,
    open_frames,
    open_results,
    save_frames,
    save_results,
    store_info,
)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_is_bit_identical_on_a_cluster(client, tmp_path, photon_stack):
    out = save_frames(photon_stack, tmp_path / "run.zarr", batch_frames=16)
    for name in ("frames", "mask", "label", "orientation"):
        a, b = photon_stack[name].values, out[name].values
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert dd.get_geometry(out) == dd.get_geometry(photon_stack)
    assert out.attrs["units"] == "photons"
    assert out.frames.data.chunks[0] == (16, 16, 16, 16, 6)  # one Dask chunk per shard
    float_stack = photon_stack.assign(frames=photon_stack.frames.astype("float32") - 0.5)
    back = save_frames(float_stack, tmp_path / "float.zarr", batch_frames=32)
    assert np.array_equal(back.frames.values, float_stack.frames.values)


def test_store_layout_is_sharded_compressed_and_consolidated(tmp_path, photon_stack):
    save_frames(photon_stack, tmp_path / "run.zarr", batch_frames=20, inner_frames=5)
    arr = zarr.open_array(tmp_path / "run.zarr", path="frames", mode="r")
    assert arr.shards == (20, 24, 30) and arr.chunks == (5, 24, 30)
    codec = arr.compressors[0]
    assert type(codec).__name__ == "BloscCodec" and codec.cname.value == "zstd" and codec.shuffle.value == "bitshuffle"
    assert arr.metadata.dimension_names == ("frame", "y", "x")
    root = json.loads((tmp_path / "run.zarr" / "zarr.json").read_text())
    assert "consolidated_metadata" in root and "frames" in root["consolidated_metadata"]["metadata"]
    shard_files = sorted(p.name for p in (tmp_path / "run.zarr" / "frames" / "c").iterdir())
    assert shard_files == ["0", "1", "2", "3"]  # 70 frames in shards of 20
    info = store_info(tmp_path / "run.zarr")
    stored = sum(p.stat().st_size for p in (tmp_path / "run.zarr" / "frames").rglob("*") if p.is_file())
    assert info["stored_bytes"] == stored
    assert info["compression_ratio"] == pytest.approx(70 * 24 * 30 * 2 / stored)
    assert info["compression_ratio"] > 3  # Poisson(0.05) counts are mostly zeros
    assert (info["n_frames"], info["frame_shape"], info["batch_frames"], info["inner_frames"]) == (70, (24, 30), 20, 5)


def test_open_frames_reads_metadata_only(tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    save_frames(photon_stack, path, batch_frames=16)
    shutil.rmtree(path / "frames" / "c")  # if open_frames read any frame data, it could not succeed now

    class Count(Callback):
        started = 0

        def _start_state(self, dsk, state):
            Count.started += len(state["ready"]) + len(state["waiting"])

    with Count():
        ds = open_frames(path)
    assert Count.started == 0
    assert ds.frames.shape == (70, 24, 30) and isinstance(ds.frames.data, da.Array)
    with pytest.raises(dd.IncompleteStoreError, match="frames 0–15"):  # lost frames are never zeros
        ds.frames[:16].values


def _failing(ds: xr.Dataset, bad_block: int) -> xr.Dataset:
    def fail(block, block_info=None):
        if block_info[0]["chunk-location"][0] == bad_block:
            raise RuntimeError("detector readout failed")
        return block

    frames = ds.frames.data.map_blocks(fail, dtype=ds.frames.dtype)
    return ds.assign(frames=(ds.frames.dims, frames))


def test_interrupted_write_resumes_to_a_bit_identical_store(client, tmp_path, photon_stack):
    stack = photon_stack.chunk({"frame": 10})
    save_frames(stack, tmp_path / "ref.zarr", batch_frames=10)

    job = tmp_path / "job.zarr"
    with pytest.raises(RuntimeError, match="detector readout failed"):
        save_frames(_failing(stack, bad_block=3), job, batch_frames=10)
    with pytest.raises(dd.IncompleteStoreError, match="batches are not written"):
        open_frames(job)
    done = zarr.open_array(job, path="_diffdask/done", mode="r")[:]
    assert done[3] == -1
    # A worker killed half-way through batch 3 leaves garbage that is not marked done.
    zarr.open_array(job, path="frames", mode="r+")[30:35] = 999
    pending_before = int((done < 0).sum())

    resumed = save_frames(stack, job, batch_frames=10, compute=False)
    writes = [k for k in dict(resumed.__dask_graph__()) if str(k).startswith("_write_batch")]
    # Batches of the failed job still running when it raised may finish meanwhile: the resumed
    # job writes exactly the batches not done when it was prepared, never a finished one.
    pending_after = int((zarr.open_array(job, path="_diffdask/done", mode="r")[:] < 0).sum())
    assert 1 <= pending_after <= len(writes) <= pending_before
    dask.compute(resumed)
    assert _tree(tmp_path / "ref.zarr") == _tree(job)
    assert np.array_equal(open_frames(job).frames.values, photon_stack.frames.values)


def test_rerun_of_a_complete_store_writes_nothing(tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    save_frames(photon_stack, path, batch_frames=16)
    before = _tree(path)
    job = save_frames(photon_stack, path, batch_frames=16, compute=False)
    assert not [k for k in dict(job.__dask_graph__()) if str(k).startswith("_write_batch")]
    dask.compute(job)
    assert _tree(path) == before


def test_existing_different_data_is_never_overwritten_silently(tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    save_frames(photon_stack, path, batch_frames=16)
    other = photon_stack.isel(frame=slice(0, 50))
    with pytest.raises(dd.StoreExistsError, match="overwrite=True"):
        save_frames(other, path, batch_frames=16)
    assert open_frames(path).sizes["frame"] == 70
    out = save_frames(other, path, batch_frames=16, overwrite=True)
    assert out.sizes["frame"] == 50 and np.array_equal(out.frames.values, other.frames.values)
    junk = tmp_path / "notes"
    junk.mkdir()
    (junk / "todo.txt").write_text("not a store")
    with pytest.raises(dd.StoreExistsError, match="not a diffdask store") as err:
        save_frames(other, junk)
    assert "overwrite" not in str(err.value).replace(str(junk), "")  # the message must not point at the flag that deletes


def _files(root):
    return sorted((p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*") if p.is_file())


def test_overwrite_never_deletes_what_diffdask_did_not_write(tmp_path, photon_stack):
    """A user's directory or a foreign Zarr store survives save_frames(..., overwrite=True) intact."""
    import zarr

    user = tmp_path / "my_data"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("beamtime notes")
    (user / "sub" / "scan.h5").write_bytes(b"\x89HDF not really")
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w", zarr_format=3).create_array("x", shape=(3,), dtype="f4")[:] = 1.0
    for target, message in ((user, "not a diffdask store"), (foreign, "diffdask did not write")):
        before = _files(target)
        for overwrite in (False, True):
            with pytest.raises(dd.StoreExistsError, match=message) as err:
                save_frames(photon_stack, target, batch_frames=16, overwrite=overwrite)
            assert "overwrite" not in str(err.value).replace(str(target), "")
        assert _files(target) == before, target
    empty = tmp_path / "empty"
    empty.mkdir()
    assert save_frames(photon_stack, empty, batch_frames=16, overwrite=True).sizes["frame"] == 70


def test_nonfinite_pixels_are_counted_kept_and_warned(tmp_path, photon_stack):
    frames = photon_stack.frames.data.astype("float32")
    frames = da.where(da.arange(70)[:, None, None] == 3, np.nan, frames)  # one bad frame
    stack = photon_stack.assign(frames=(("frame", "y", "x"), frames))
    with pytest.warns(dd.NonFinitePixelsWarning, match=f"{24 * 30} frame pixels"):
        out = save_frames(stack, tmp_path / "nan.zarr", batch_frames=16)
    assert np.isnan(out.frames[3].values).all()  # kept as recorded: nothing is lost
    assert store_info(tmp_path / "nan.zarr")["n_nonfinite_pixels"] == 24 * 30


def test_results_are_stored_beside_the_frames_and_resumable(client, tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    ds = save_frames(photon_stack, path, batch_frames=16)
    total = ds.frames.sum(dim=("y", "x")).astype("float64")
    results = xr.Dataset(
        {"total": total, "profile": (("frame", "radius"), da.ones((70, 4), chunks=(7, 4)))},
        coords={"radius": np.arange(4.0)},
        attrs={"parameters": {"threshold": 2}},
    )
    back = save_results(results, path, "summary")
    assert np.array_equal(back.total.values, photon_stack.frames.values.sum(axis=(1, 2)))
    assert np.array_equal(back.radius.values, np.arange(4.0)) and back.attrs["parameters"] == {"threshold": 2}
    assert list_results(path) == ["summary"]
    assert store_info(path)["results"] == ["summary"]
    assert np.array_equal(open_results(path, "results/summary").profile.values, np.ones((70, 4)))
    assert np.array_equal(open_frames(path).frames.values, photon_stack.frames.values)  # frames untouched
    named = save_results(total.rename("photons"), path, "photons")
    assert "photons" in named
    with pytest.raises(dd.SchemaError, match="frames"):
        save_results(total[:10], path, "short")
    with pytest.raises(dd.ParameterError, match="plain name"):
        save_results(total, path, "../escape")
    with pytest.raises(dd.StoreFormatError, match="no result"):
        open_results(path, "psd")


def test_bad_paths_and_stores_are_clear_errors(tmp_path):
    with pytest.raises(dd.StoreNotFoundError, match="no file or store"):
        open_frames(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(dd.StoreFormatError, match="neither a Zarr v3 store"):
        open_frames(tmp_path / "plain")
    (tmp_path / "text.txt").write_text("hello")
    with pytest.raises(dd.StoreFormatError, match="neither a Zarr v3 store"):
        open_frames(tmp_path / "text.txt")
    xr.Dataset({"data": (("t", "y"), np.zeros((2, 2)))}).to_zarr(tmp_path / "foreign.zarr", zarr_format=3)
    with pytest.raises(dd.SchemaError, match="no 'frames' variable"):
        open_frames(tmp_path / "foreign.zarr")


def test_bad_write_parameters_are_refused(tmp_path, photon_stack):
    with pytest.raises(dd.ParameterError, match="batch_frames"):
        save_frames(photon_stack, tmp_path / "a.zarr", batch_frames=0)
    with pytest.raises(dd.ParameterError, match="divide"):
        save_frames(photon_stack, tmp_path / "a.zarr", batch_frames=10, inner_frames=3)
    with pytest.raises(dd.ParameterError, match="clevel"):
        save_frames(photon_stack, tmp_path / "a.zarr", clevel=12)
    assert not os.path.exists(tmp_path / "a.zarr")


def test_fsspec_urls_work_for_reads_and_writes(photon_stack):
    url = "memory://diffdask-test/run.zarr"
    save_frames(photon_stack, url, batch_frames=32, compute=False).compute(scheduler="sync")
    with dask.config.set(scheduler="sync"):
        ds = open_frames(url)
        assert np.array_equal(ds.frames.values, photon_stack.frames.values)


def test_results_left_half_created_by_a_killed_job_are_replaced_or_refused(tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    save_frames(photon_stack, path, batch_frames=16)  # consolidated metadata: no results yet
    root = zarr.open_group(path, mode="a", use_consolidated=False)
    partial = root.require_group("results/summary")  # what a job killed in save_results leaves
    partial.create_array("total", shape=(70,), dtype="f8")
    total = xr.DataArray(photon_stack.frames.values.sum(axis=(1, 2)).astype("f8"), dims="frame", name="photons")
    with pytest.raises(dd.StoreExistsError, match="overwrite=True"):
        save_results(total, path, "summary")
    back = save_results(total, path, "summary", overwrite=True)
    assert np.array_equal(back.photons.values, total.values)
    assert list_results(path) == ["summary"]


def test_results_made_with_other_parameters_are_refused_not_resumed(tmp_path, photon_stack):
    path = tmp_path / "run.zarr"
    save_frames(photon_stack, path, batch_frames=16)
    total = xr.DataArray(photon_stack.frames.values.sum(axis=(1, 2)).astype("f8"), dims="frame", name="total")
    save_results(total.to_dataset().assign_attrs(threshold=1.0), path, "hits")
    save_results(total.to_dataset().assign_attrs(threshold=1.0), path, "hits")  # identical re-run: fine
    with pytest.raises(dd.StoreExistsError, match="parameters"):
        save_results((total * 2).to_dataset().assign_attrs(threshold=2.0), path, "hits")
    back = save_results((total * 2).to_dataset().assign_attrs(threshold=2.0), path, "hits", overwrite=True)
    assert back.attrs["threshold"] == 2.0 and np.array_equal(back.total.values, 2 * total.values)


def _shard(path, b):
    return Path(path) / "frames" / "c" / str(b) / "0" / "0"


def test_all_zero_shards_are_written_and_read_back(tmp_path, photon_stack):
    frames = photon_stack.frames.values.copy()
    frames[16:32] = 0  # one whole batch of empty frames
    stack = dd.make_frame_stack(frames, mask=photon_stack.mask.values)
    store = tmp_path / "zeros.zarr"
    save_frames(stack, store, batch_frames=16)
    assert all(_shard(store, b).is_file() for b in range(5))
    np.testing.assert_array_equal(open_frames(store).frames.values, frames)


def test_a_deleted_shard_is_an_error_naming_the_frames_never_zeros(tmp_path, photon_stack):
    store = tmp_path / "run.zarr"
    save_frames(photon_stack, store, batch_frames=16)
    _shard(store, 2).unlink()
    ds = open_frames(store)
    with pytest.raises(dd.IncompleteStoreError, match=r"frames 32–47 .*re-ingest"):
        dd.summarize(ds, threshold=0.5).compute()
    with pytest.raises(dd.IncompleteStoreError, match=r"frames 32–47"):
        save_results(dd.summarize(ds, threshold=0.5), store, "summary")
    assert "summary" not in list_results(store)  # nothing computed from the lost frames is kept
    # The frames that are there still read.
    np.testing.assert_array_equal(ds.frames[:32].values, photon_stack.frames.values[:32])


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_shard_is_a_store_format_error_naming_the_frames(tmp_path, photon_stack, damage):
    store = tmp_path / "run.zarr"
    save_frames(photon_stack, store, batch_frames=16)
    shard = _shard(store, 1)
    raw = bytearray(shard.read_bytes())
    if damage == "flip":
        for i in range(8, len(raw) - 64, max(1, len(raw) // 16)):
            raw[i] ^= 0xFF
    else:
        raw = raw[: len(raw) // 2]
    shard.write_bytes(bytes(raw))
    with pytest.raises(dd.StoreFormatError, match=r"frames 16–31 of array 'frames'.*re-copy"):
        open_frames(store).frames.values


def test_a_deleted_mask_is_reported_as_missing_not_as_an_inverted_mask(tmp_path, photon_stack):
    store = tmp_path / "run.zarr"
    save_frames(photon_stack, store, batch_frames=16)
    for chunk in (Path(store) / "mask" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()
    with pytest.raises(dd.IncompleteStoreError, match="array 'mask' .* chunks missing"):
        open_frames(store)


def test_a_failed_overwrite_leaves_the_old_store_readable(tmp_path, photon_stack):
    store = tmp_path / "run.zarr"
    save_frames(photon_stack, store, batch_frames=16)
    other = photon_stack.isel(frame=slice(0, 50)).copy()
    other["frames"] = other.frames + 1
    with dask.config.set(scheduler="sync"), pytest.raises(RuntimeError, match="detector readout failed"):
        save_frames(_failing(other.chunk({"frame": 10}), bad_block=2), store, batch_frames=10, overwrite=True)
    old = open_frames(store)  # still the old, complete store
    assert old.sizes["frame"] == 70
    np.testing.assert_array_equal(old.frames.values, photon_stack.frames.values)
    new = save_frames(other, store, batch_frames=10, overwrite=True)  # the re-run finishes the swap
    assert new.sizes["frame"] == 50
    np.testing.assert_array_equal(open_frames(store).frames.values, other.frames.values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]  # no staging copy left behind


WRITER = """
import sys, time
import numpy as np
import diffdask as dd
ds = dd.make_frame_stack(np.ones((20, 8, 8), np.uint16))
dd.save_frames(ds, sys.argv[1], batch_frames=10, compute=False)  # claims the store, writes nothing yet
print("claimed", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, photon_stack):
    import subprocess
    import sys

    store = tmp_path / "run.zarr"
    first = subprocess.Popen([sys.executable, "-c", WRITER, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "claimed"
        with pytest.raises(dd.StoreExistsError, match=rf"another job .*pid {first.pid}"):
            save_frames(photon_stack, store, batch_frames=16)
    finally:
        first.kill()
        first.wait()
    # The first writer is gone (killed mid-job): its lock is stale and the store is taken over.
    out = save_frames(photon_stack, store, batch_frames=16, overwrite=True)
    assert out.sizes["frame"] == 70
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.zarr"]

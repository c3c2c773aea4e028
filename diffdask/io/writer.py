"""The frame-stack writer: safe, resumable batched writes into Zarr v3 stores.

Every format that produces a stored frame stack goes through here (`save_frames` from any
frame stack, `ingest_hdf5` from HDF5/CXI files, `save_results` for results beside the frames).

Writes are safe from many workers and resumable. The arrays are pre-allocated, then each
batch writes whole shards/chunks (no two tasks touch one object) and only then sets its
``done`` entry. A killed or failed job leaves the store marked incomplete; running the same
save again skips finished batches, rewrites unfinished ones, and marks the store complete
(with consolidated metadata) only when every batch is done. ``append_dim`` is never used: a
failed append resizes arrays and drops consolidated metadata. An existing store is replaced
only when diffdask wrote it, through a staging copy swapped in when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import psutil
import xarray as xr
import zarr

from diffdask._version import __version__
from diffdask.errors import (
    IncompleteStoreError,
    ParameterError,
    SchemaError,
    StoreExistsError,
    StoreFormatError,
)
from diffdask.frames import frames_per_chunk, validate, warn_nonfinite
from diffdask.geometry import Geometry
from diffdask.io.hdf5 import CXI_DATA, open_hdf5
from diffdask.io.location import Location
from diffdask.io.zarr_store import (
    BOOKKEEPING_ATTR,
    BOOKKEEPING_GROUP,
    FORMAT_VERSION,
    INNER_CHUNK_BYTES,
    _compressor,
    _is_diffdask_store,
    _is_zarr_group,
    _jsonable,
    _open_group,
    _results_path,
    open_frames,
    open_results,
)


@dataclass(frozen=True)
class _Plan:
    """What one batched write job does; small and picklable for the worker tasks."""

    location: Location
    group: str
    n_frames: int
    batch: int
    frame_vars: tuple[str, ...]
    count_nonfinite: str | None
    replaces: Location | None = None  # a store this one is swapped into when complete

    def bounds(self, i: int) -> tuple[int, int]:
        return i * self.batch, min((i + 1) * self.batch, self.n_frames)

    @property
    def n_batches(self) -> int:
        return max(1, -(-self.n_frames // self.batch))


def _layout(ds: xr.Dataset, batch: int) -> dict[str, Any]:
    # The attrs (geometry, provenance, the parameters that made a result) are part of what a
    # re-run must match to resume: the same shapes made with other parameters are other data.
    return {
        "n_frames": int(ds.sizes["frame"]),
        "batch_frames": int(batch),
        "attrs": _jsonable({k: v for k, v in ds.attrs.items() if k != BOOKKEEPING_ATTR}),
        "variables": {
            str(n): {"dims": list(map(str, v.dims)), "shape": list(v.shape), "dtype": str(v.dtype)}
            for n, v in sorted(ds.variables.items(), key=lambda kv: str(kv[0]))
        },
    }


def _prepare(
    ds: xr.Dataset,
    loc: Location,
    group: str,
    batch: int,
    overwrite: bool,
    frames_chunk: tuple[int, int] | None,
    clevel: int,
) -> tuple[_Plan, list[int]]:
    """Pre-allocate ``group`` (or find it allocated by an earlier run); return the pending batches."""
    layout = _layout(ds, batch)
    root_exists = loc.exists()
    if root_exists and loc.is_hdf5_file():
        raise StoreExistsError(f"{loc.url!r} is an HDF5 file; write the Zarr store to another path.")
    if root_exists and group == "" and loc.fs.ls(loc.fs_path) and not _is_diffdask_store(loc):
        # Never delete (overwrite) or mix into what diffdask did not write.
        what = "a Zarr store that diffdask did not write" if _is_zarr_group(loc) else "not a diffdask store"
        raise StoreExistsError(
            f"{loc.url!r} exists and is {what}; diffdask never replaces or deletes data it did not "
            "write. Choose another (new or empty) path for the store."
        )
    if group == "" and overwrite:
        root = _open_group(loc, "w")
    else:
        root = _open_group(loc, "a")
    g = root if group == "" else root.require_group(group)
    meta = g.attrs.get(BOOKKEEPING_ATTR)
    if meta is not None and meta.get("layout") == layout and not (overwrite and group):
        _remove_torn_writes(loc, group)
        plan = _plan_for(ds, loc, group, batch)
        done = np.asarray(g[f"{BOOKKEEPING_GROUP}/done"][:])
        return plan, [int(i) for i in np.flatnonzero(done < 0)]
    if meta is not None or len(list(g.array_keys())) > 0:
        if not overwrite:
            what = "a different frame stack" if group == "" else f"a different result {group!r}"
            raise StoreExistsError(
                f"{loc.url!r} already holds {what} (other shape, dtype, variables, batch size or "
                "parameters); pass overwrite=True (--overwrite on the command line) to replace it, or "
                "write to another path or group."
            )
        g = root.create_group(group, overwrite=True) if group else _open_group(loc, "w")
    for name, var in ds.variables.items():
        name = str(name)
        shards = None
        if "frame" in var.dims:
            chunks = (batch,) + tuple(var.shape[1:])
            if name == "frames" and frames_chunk is not None:
                shards, chunks = chunks, (frames_chunk[0],) + tuple(var.shape[1:])
        else:
            chunks = tuple(var.shape) or ()
        arr = g.create_array(
            name,
            shape=var.shape,
            dtype=var.dtype,
            chunks=tuple(max(1, c) for c in chunks) if chunks else (),
            shards=shards,
            compressors=_compressor(var.dtype, clevel) if var.dtype.kind in "biuf" else "auto",
            dimension_names=tuple(map(str, var.dims)),
            fill_value=0 if var.dtype.kind in "biufc" else None,
            attributes=_jsonable(dict(var.attrs)),
        )
        if "frame" not in var.dims:
            arr.with_config({"write_empty_chunks": True})[...] = np.asarray(var.values)
    n_batches = max(1, -(-layout["n_frames"] // batch))
    bk = g.require_group(BOOKKEEPING_GROUP)
    bk.create_array("done", shape=(n_batches,), chunks=(1,), dtype="int64", fill_value=-1, overwrite=True)
    attrs = _jsonable({k: v for k, v in ds.attrs.items() if k != BOOKKEEPING_ATTR})
    coords = [str(c) for c in ds.coords if c not in ds.dims]
    if coords:
        attrs["coordinates"] = " ".join(coords)
    attrs["diffdask_version"] = __version__
    attrs[BOOKKEEPING_ATTR] = {
        "format": FORMAT_VERSION, "layout": layout, "complete": False, "every_shard_written": True,
    }  # fmt: skip
    g.attrs.update(attrs)
    return _plan_for(ds, loc, group, batch), list(range(n_batches))


#: How zarr's local store names a file while writing it (``<key>.<uuid4 hex>.partial``, renamed
#: into place when complete): one left behind is a write that a killed process never finished.
_TORN_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def _remove_torn_writes(loc: Location, group: str) -> None:
    """Delete the half-written temporary files a killed writer left in a diffdask store it resumes.

    Only zarr's own temporary files are removed (their names say so), inside a store that the
    caller has recognised as diffdask's; the shards they were meant to become are rewritten
    because their batches are not marked done.
    """
    if not loc.is_local:
        return  # object stores write each object whole: nothing is left half-written
    root = Path(loc.fs_path) / group
    for path in root.rglob("*.partial"):
        if _TORN_WRITE.search(path.name) and path.is_file():
            path.unlink()


def _plan_for(ds: xr.Dataset, loc: Location, group: str, batch: int) -> _Plan:
    frame_vars = tuple(str(n) for n, v in ds.variables.items() if "frame" in v.dims)
    count = "frames" if "frames" in frame_vars and ds["frames"].dtype.kind == "f" else None
    return _Plan(loc, group, int(ds.sizes["frame"]), int(batch), frame_vars, count)


def _write_batch(plan: _Plan, index: int, blocks: Mapping[str, Any]) -> int:
    """Write batch ``index`` of every per-frame variable, then mark it done."""
    g = _open_group(plan.location, "r+", plan.group)
    start, stop = plan.bounds(index)
    n_nonfinite = 0
    for name, block in blocks.items():
        values = np.asarray(block)
        if name == plan.count_nonfinite:
            n_nonfinite = int(values.size - np.count_nonzero(np.isfinite(values)))
        # Every shard is written, all-zero ones too, so a missing shard file means lost data.
        g[name].with_config({"write_empty_chunks": True})[start:stop] = values
    # Marking done last: a batch killed before this line is rewritten by the next run.
    g[f"{BOOKKEEPING_GROUP}/done"][index] = n_nonfinite
    return n_nonfinite


def _finish(plan: _Plan, _written: list[int], lock: str | None = None) -> dict[str, Any]:
    """Mark the group complete once every batch is done; consolidate the store's metadata."""
    g = _open_group(plan.location, "r+", plan.group)
    done = np.asarray(g[f"{BOOKKEEPING_GROUP}/done"][:])
    if np.any(done < 0):
        raise IncompleteStoreError(
            f"{int(np.sum(done < 0))} batches of {plan.location.url!r} are not written; run the save again."
        )
    meta = dict(g.attrs[BOOKKEEPING_ATTR])
    meta.update(complete=True, n_nonfinite_pixels=int(done.sum()))
    g.attrs[BOOKKEEPING_ATTR] = meta
    with warnings.catch_warnings():
        # Consolidated metadata is not yet in the Zarr v3 spec; zarr-python and xarray read it.
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(_open_group(plan.location, "r+").store)
    if plan.replaces is not None:
        _swap(plan.location, plan.replaces)
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
    return meta


def _take_lock(loc: Location) -> str | None:
    """Claim a local store for this process's write job; refuse a store another live job writes.

    The lock is a small JSON file beside the store (``.NAME.diffdask-lock``: host, pid, time);
    the job's last task removes it. A lock left by a process that is gone (same host, pid not
    running) is taken over; one from another host must be removed by hand.
    """
    if not loc.is_local:
        return None
    head, name = os.path.split(loc.fs_path.rstrip("/"))
    path = os.path.join(head, f".{name}.diffdask-lock")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.makedirs(head, exist_ok=True)
    for _ in range(2):
        try:
            with open(path, "x") as f:
                json.dump(me, f)
            return path
        except FileExistsError:
            try:
                with open(path) as f:
                    other = json.load(f)
            except (OSError, ValueError):
                other = {}
            mine = other.get("host") == me["host"] and other.get("pid") == me["pid"]
            if mine or (other.get("host") == me["host"] and not psutil.pid_exists(int(other.get("pid", -1)))):
                os.remove(path)  # our own earlier job in this process, or one that died
                continue
            raise StoreExistsError(
                f"{loc.url!r} is being written by another job (host {other.get('host')!r}, pid "
                f"{other.get('pid')}, since {other.get('since')}); wait for it to finish. If that job is "
                f"gone, remove {path!r}."
            )
    raise StoreExistsError(f"could not claim {loc.url!r} for writing: {path!r} keeps coming back.")


def _staging(loc: Location) -> Location:
    """Where the replacement of a local store is written: a hidden sibling, fixed by the name."""
    head, name = os.path.split(loc.fs_path.rstrip("/"))
    return Location.of(os.path.join(head, f".{name}.diffdask-replacing"))


def _swap(new: Location, old: Location) -> None:
    """Put the complete store ``new`` in place of ``old``; until the first rename, ``old`` is intact."""
    retired = f"{_staging(old).fs_path}-old"
    shutil.rmtree(retired, ignore_errors=True)
    os.rename(old.fs_path, retired)
    os.rename(new.fs_path, old.fs_path)
    shutil.rmtree(retired, ignore_errors=True)


def _batched_write(
    ds: xr.Dataset,
    loc: Location,
    group: str,
    batch: int,
    overwrite: bool,
    frames_chunk: tuple[int, int] | None,
    clevel: int,
) -> Any:
    lock = _take_lock(loc)
    try:
        if group == "" and overwrite and loc.is_local and _is_diffdask_store(loc):
            # Replacing a store: the new one is written beside it and swapped in when complete, so a
            # failed or killed overwrite leaves the old store readable (and a re-run resumes).
            staging = _staging(loc)
            if staging.exists() and not _is_diffdask_store(staging):
                raise StoreExistsError(f"{staging.url!r} is in the way of replacing {loc.url!r}; move it away.")
            try:
                plan, pending = _prepare(ds, staging, "", batch, False, frames_chunk, clevel)
            except StoreExistsError:  # an abandoned replacement of other data: ours to replace
                plan, pending = _prepare(ds, staging, "", batch, True, frames_chunk, clevel)
            plan = dataclasses.replace(plan, replaces=loc)
        else:
            plan, pending = _prepare(ds, loc, group, batch, overwrite, frames_chunk, clevel)
    except BaseException:
        if lock is not None:
            os.remove(lock)
        raise
    blocks: dict[str, np.ndarray] = {}
    for name in plan.frame_vars:
        data = ds.variables[name].data
        arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=-1)
        arr = arr.rechunk({0: batch, **{i: -1 for i in range(1, arr.ndim)}})
        # optimize_graph=False keeps the variables' shared tasks shared: optimising each
        # variable's graph on its own renames (fuses) them, and a kernel that makes several
        # results (summarize) would then run once per variable instead of once per chunk.
        blocks[name] = arr.to_delayed(optimize_graph=False).ravel()
    writes = [
        dask.delayed(_write_batch, pure=False)(plan, i, {n: b[i] for n, b in blocks.items()})
        for i in pending
    ]
    return dask.delayed(_finish, pure=False)(plan, writes, lock)


def _batch_size(ds: xr.Dataset, batch_frames: int | None) -> int:
    if batch_frames is None:
        fr = ds["frames"]
        return min(frames_per_chunk(fr.shape[1:], fr.dtype), max(1, fr.shape[0]))
    if int(batch_frames) < 1:
        raise ParameterError(f"batch_frames must be ≥ 1, got {batch_frames}.")
    return int(batch_frames)


def save_frames(
    ds: xr.Dataset,
    store: Any,
    *,
    overwrite: bool = False,
    batch_frames: int | None = None,
    inner_frames: int | None = None,
    clevel: int = 3,
    storage_options: Mapping[str, Any] | None = None,
    compute: bool = True,
) -> Any:
    """Write a frame stack to a Zarr v3 store, in resumable batches.

    ``frames`` is sharded along ``frame``: one shard per batch of ``batch_frames`` frames
    (≈ 96 MiB by default, like one Dask chunk), holding inner chunks of ``inner_frames``
    frames (≈ 2 MiB), compressed with Blosc zstd + bitshuffle. Per-frame variables get one
    chunk per batch; ``mask`` and other non-frame variables are written first, whole.

    Parameters
    ----------
    ds : xarray.Dataset
        A frame stack (see `diffdask.frames`).
    store : str or os.PathLike
        Local path or fsspec URL (``s3://bucket/run.zarr``).
    overwrite : bool
        Replace a diffdask store that holds something else. Without it, a store written by an
        identical, unfinished save is resumed and anything else raises `StoreExistsError`.
        A path holding anything diffdask did not write (user files, a foreign Zarr store) is
        never deleted, with or without ``overwrite``: `StoreExistsError`. A local store is
        replaced by writing the new one beside it (``.NAME.diffdask-replacing``) and swapping
        it in when complete, so a failed overwrite leaves the old store readable.
    batch_frames : int, optional
        Frames per write batch = per shard.
    inner_frames : int, optional
        Frames per inner chunk (the unit a reader decompresses); must divide ``batch_frames``.
    clevel : int
        zstd compression level, 1–9. Level 3 compresses Poisson photon counts twice as fast as
        level 5 for ~10 % larger files and decodes at > 1 GB/s per core.
    storage_options : mapping, optional
        fsspec options for remote stores.
    compute : bool
        Write now (on the current Dask scheduler or distributed client) and return the
        re-opened lazy Dataset; otherwise return a ``dask.delayed`` object whose
        computation writes the store and returns its bookkeeping.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed

    Raises
    ------
    StoreExistsError
        The store holds other data and ``overwrite`` is False.
    SchemaError, GeometryError, ParameterError
        Invalid frame stack or arguments.
    """
    validate(ds)
    if not 1 <= int(clevel) <= 9:
        raise ParameterError(f"clevel must be in 1..9, got {clevel}.")
    batch = _batch_size(ds, batch_frames)
    frame_bytes = int(np.prod(ds["frames"].shape[1:])) * ds["frames"].dtype.itemsize
    if inner_frames is None:
        inner = max(1, min(batch, INNER_CHUNK_BYTES // max(1, frame_bytes)))
        while batch % inner:
            inner -= 1
    else:
        inner = int(inner_frames)
        if inner < 1 or batch % inner:
            raise ParameterError(f"inner_frames ({inner_frames}) must be ≥ 1 and divide batch_frames ({batch}).")
    loc = Location.of(store, storage_options)
    job = _batched_write(ds, loc, "", batch, overwrite, (inner, batch), int(clevel))
    if not compute:
        return job
    meta = dask.compute(job)[0]
    if meta.get("n_nonfinite_pixels"):
        warn_nonfinite(meta["n_nonfinite_pixels"])
    return open_frames(loc)


def save_results(
    results: xr.Dataset | xr.DataArray,
    store: Any,
    group: str,
    *,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    compute: bool = True,
) -> Any:
    """Store per-frame results beside the frames, in ``results/<group>``.

    Written in the same resumable batches as the frames (the store's batch size), so a
    re-run after a failure continues where it stopped. Results are the lazy outputs of
    diffdask functions; their attrs (parameters, version) are kept.

    Parameters
    ----------
    results : xarray.Dataset or xarray.DataArray
        Variables aligned on ``frame`` (same length as the store's frames); others are
        written whole (e.g. a radius coordinate).
    store : str or os.PathLike
        A frame-stack store written by `save_frames`.
    group : str
        Result name (``"com"``, ``"psd"``...).
    overwrite : bool
        Replace an existing, different result of that name.
    storage_options : mapping, optional
        fsspec options.
    compute : bool
        Write now and return the re-opened results, or return a ``dask.delayed`` job.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
    """
    if isinstance(results, xr.DataArray):
        results = results.to_dataset(name=results.name or group.split("/")[-1])
    if not isinstance(results, xr.Dataset):
        raise SchemaError(f"results must be an xarray Dataset or DataArray, got {type(results).__name__}.")
    path = _results_path(group)
    loc = Location.of(store, storage_options)
    loc.require()
    root = _open_group(loc, "r")
    meta = root.attrs.get(BOOKKEEPING_ATTR)
    if meta is None:
        raise StoreFormatError(f"{loc.url!r} is not a diffdask frame-stack store; save the frames first.")
    n = meta["layout"]["n_frames"]
    if "frame" not in results.dims:
        raise SchemaError("results must have a 'frame' dimension aligned with the store's frames.")
    if results.sizes["frame"] != n:
        raise SchemaError(
            f"results have {results.sizes['frame']} frames but the store holds {n}; compute them on "
            "the whole stack opened from this store."
        )
    job = _batched_write(results, loc, path, meta["layout"]["batch_frames"], overwrite, None, 3)
    if not compute:
        return job
    dask.compute(job)
    return open_results(loc, group)


def ingest_hdf5(
    src: Any,
    store: Any,
    dataset: str = CXI_DATA,
    mask: Any = None,
    geometry: Geometry | None = None,
    *,
    per_frame: Mapping[str, str] | None = None,
    batch_frames: int | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    compute: bool = True,
) -> Any:
    """Stream an HDF5/CXI dataset of any size into a Zarr v3 frame-stack store.

    Each batch (one shard of the store) is read from the file by a Dask task and written
    whole; the job is resumable exactly like `diffdask.io.save_frames`: re-running it after a
    failure skips the batches already written.

    Parameters
    ----------
    src, dataset, mask, geometry, per_frame
        As in `open_hdf5`.
    store : str or os.PathLike
        Destination Zarr store (path or fsspec URL).
    batch_frames : int, optional
        Frames per batch/shard (≈ 96 MiB by default).
    overwrite : bool
        Replace a store that holds something else.
    storage_options : mapping, optional
        fsspec options of the destination.
    compute : bool
        Run now and return the opened store, or return a ``dask.delayed`` job.

    Returns
    -------
    xarray.Dataset or dask.delayed.Delayed
    """
    ds = open_hdf5(src, dataset, mask=mask, geometry=geometry, chunks=batch_frames, per_frame=per_frame)
    batch = batch_frames or ds["frames"].data.chunks[0][0]
    return save_frames(
        ds, store, overwrite=overwrite, batch_frames=batch, storage_options=storage_options, compute=compute
    )

"""Frame stacks and results in Zarr v3 stores: safe batched writes, lazy reads.

Layout of a store::

    zarr.json                  root group: dataset attrs (geometry, provenance), consolidated metadata
    frames/                    (frame, y, x), sharded along frame: one shard = one write batch
    mask/                      (y, x) bool
    <per-frame variables>/     (frame, ...), one chunk per write batch
    _diffdask/done             one entry per batch: -1 = not written, else its non-finite pixel count
    results/<name>/            result datasets aligned on frame, each with its own _diffdask/done

Writes are safe from many workers and resumable. The arrays are pre-allocated, then each
batch writes whole shards/chunks (no two tasks touch one object) and only then sets its
``done`` entry. A killed or failed job leaves the store marked incomplete; running the same
save again skips finished batches, rewrites unfinished ones, and marks the store complete
(with consolidated metadata) only when every batch is done. ``append_dim`` is never used: a
failed append resizes arrays and drops consolidated metadata.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import psutil
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from diffdask._version import __version__
from diffdask.errors import (
    IncompleteStoreError,
    ParameterError,
    SchemaError,
    StoreExistsError,
    StoreFormatError,
)
from diffdask.frames import frames_per_chunk, validate, warn_nonfinite
from diffdask.io.location import Location

#: Attribute of every group diffdask writes: its bookkeeping (layout, completeness).
BOOKKEEPING_ATTR = "_diffdask"
BOOKKEEPING_GROUP = "_diffdask"
RESULTS_GROUP = "results"
FORMAT_VERSION = 1
#: Target size of one inner (compressed) chunk of frames inside a shard, bytes: the unit a
#: random-access reader decompresses; below ~1 MiB the per-chunk overhead of zarr-python halves
#: the read throughput.
INNER_CHUNK_BYTES = 2 * 2**20


def _jsonable(value: Any) -> Any:
    """Attribute values as JSON types (NumPy scalars and arrays become Python ones)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _compressor(dtype: np.dtype, clevel: int) -> BloscCodec:
    # Photon counts are mostly 0/1: bit-shuffling puts the few set bits together for zstd.
    return BloscCodec(cname="zstd", clevel=clevel, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize)


def _open_group(loc: Location, mode: str, path: str = "") -> zarr.Group:
    try:
        return zarr.open_group(
            store=loc.url,
            mode=mode,
            path=path or None,
            zarr_format=3,
            storage_options=loc.storage_options or None,
            # Writers must see the store as it is: the consolidated metadata describes the last
            # finished write and misses groups a killed job left behind.
            use_consolidated=None if mode == "r" else False,
        )
    except (FileNotFoundError, KeyError, ValueError, zarr.errors.BaseZarrError) as exc:
        raise StoreFormatError(
            f"{loc.url!r} is not a readable Zarr v3 store{f' (group {path!r})' if path else ''}: {exc}. "
            "Create one with diffdask.save_frames or `diffdask ingest`."
        ) from exc


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


def _is_zarr_group(loc: Location) -> bool:
    return bool(loc.fs.exists(loc.join("zarr.json")))


def _is_diffdask_store(loc: Location) -> bool:
    """True for a Zarr group whose root metadata carries diffdask's bookkeeping."""
    if not _is_zarr_group(loc):
        return False
    try:
        return BOOKKEEPING_ATTR in _open_group(loc, "r").attrs
    except Exception:  # unreadable metadata: not recognisably ours, so not ours to delete
        return False


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


def _results_path(group: str) -> str:
    name = str(group).strip("/")
    if name.startswith(RESULTS_GROUP + "/"):
        name = name[len(RESULTS_GROUP) + 1 :]
    if not name or any(p in ("", ".", "..", BOOKKEEPING_GROUP) for p in name.split("/")):
        raise ParameterError(f"result group must be a plain name such as 'com' or 'psd', got {group!r}.")
    return f"{RESULTS_GROUP}/{name}"


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


def _open_dataset(loc: Location, group: str, allow_incomplete: bool, chunks: int | None) -> xr.Dataset:
    loc.require()
    g = _open_group(loc, "r", group)
    meta = g.attrs.get(BOOKKEEPING_ATTR)
    complete = meta is None or meta.get("complete", False)
    if not complete and not allow_incomplete:
        done = np.asarray(g[f"{BOOKKEEPING_GROUP}/done"][:])
        raise IncompleteStoreError(
            f"{loc.url!r}{f' ({group})' if group else ''} is incomplete: {int(np.sum(done < 0))} of "
            f"{done.size} batches are not written (the job that wrote it failed or was stopped). Run the "
            "same save or ingest again to finish it, or pass allow_incomplete=True to read it anyway."
        )
    if chunks is None:
        chunks = meta["layout"]["batch_frames"] if meta else None
    ds = xr.open_zarr(
        loc.url,
        group=group or None,
        storage_options=loc.storage_options or None,
        consolidated=None if complete else False,
        zarr_format=3,
        chunks={"frame": chunks} if chunks else {},
        # Zarr fill values are not missing data: a 0-photon pixel must stay 0, not NaN.
        mask_and_scale=False,
    )
    if meta is not None:
        ds.attrs.pop(BOOKKEEPING_ATTR, None)
        ds.encoding["diffdask"] = meta
        if meta.get("every_shard_written") and meta.get("complete"):
            _check_chunks(loc, group, g)
            if "frames" in ds:
                ds = _verified(ds, loc, group, g["frames"], int(meta["layout"]["batch_frames"]))
    ds.encoding["source"] = loc.url
    return ds


class _VerifiedFrames:
    """The frames of a complete diffdask store, read so that lost or damaged data is an error.

    Zarr reads a missing shard as its fill value and reports a damaged one with a codec's own
    message; here a missing shard of a batch marked written is an `IncompleteStoreError` and a
    shard that fails to decode (checksum, decompression) a `StoreFormatError`, both naming the
    store, the array and the frames, with the fix.
    """

    def __init__(self, loc: Location, path: str, array: zarr.Array, batch: int) -> None:
        self.loc, self.path, self.array, self.batch = loc, path, array, batch
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def _frames(self, start: int, stop: int) -> str:
        return f"frames {start}–{stop - 1} of array {self.path!r} in {self.loc.url!r}"

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        start, stop, _ = key[0].indices(self.shape[0]) if isinstance(key[0], slice) else (key[0], key[0] + 1, 1)
        for b in range(start // self.batch, -(-stop // self.batch)):
            shard = self.array.metadata.encode_chunk_key((b,) + (0,) * (self.ndim - 1))
            if not self.loc.fs.exists(self.loc.join(self.path, shard)):
                lo, hi = b * self.batch, min(self.shape[0], (b + 1) * self.batch)
                raise IncompleteStoreError(
                    f"{self._frames(lo, hi)} are missing (shard {shard!r} is gone although its batch was "
                    "written): re-copy the store from its source, or re-ingest those frames."
                )
        try:
            return np.asarray(self.array[key])
        except Exception as err:  # codec and checksum failures come as several exception types
            raise StoreFormatError(
                f"{self._frames(start, stop)} cannot be decoded ({type(err).__name__}: {err}); the shard "
                "is corrupt or truncated: re-copy the store from its source, or re-ingest those frames."
            ) from err


def _check_chunks(loc: Location, group: str, g: zarr.Group) -> None:
    """Every chunk of the group's small arrays (mask, per-frame variables) must be stored."""
    for name, arr in g.arrays():
        if name == "frames" or arr.nchunks_initialized == arr.nchunks:
            continue
        path = "/".join(p for p in (group, name) if p)
        raise IncompleteStoreError(
            f"array {path!r} of {loc.url!r} has {arr.nchunks - arr.nchunks_initialized} of its {arr.nchunks} "
            "chunks missing although the store was completed: re-copy the store from its source, or "
            "write it again."
        )


def _verified(ds: xr.Dataset, loc: Location, group: str, array: zarr.Array, batch: int) -> xr.Dataset:
    path = "/".join(p for p in (group, "frames") if p)
    lazy = ds["frames"]
    frames = da.from_array(
        _VerifiedFrames(loc, path, array, batch), chunks=lazy.data.chunks, name=f"verified-{lazy.data.name}"
    )
    return ds.assign(frames=(lazy.dims, frames, lazy.attrs))


def open_frames(
    path_or_url: Any,
    *,
    allow_incomplete: bool = False,
    chunks: int | None = None,
    **storage_options: Any,
) -> xr.Dataset:
    """Open a frame stack lazily: only metadata is read.

    Parameters
    ----------
    path_or_url : str or os.PathLike
        A Zarr v3 store (local or fsspec URL) written by diffdask, or an HDF5/CXI file
        (opened with `diffdask.io.open_hdf5` defaults).
    allow_incomplete : bool
        Open a store whose writing job did not finish (unwritten frames read as 0).
    chunks : int, optional
        Frames per Dask chunk; defaults to the store's shard (one shard per task).
    **storage_options
        fsspec options for remote stores.

    Returns
    -------
    xarray.Dataset
        The frame stack, backed by Dask. Bookkeeping is in ``ds.encoding["diffdask"]``.

    Raises
    ------
    StoreNotFoundError
        Nothing exists at the path.
    StoreFormatError
        The path is neither a Zarr v3 store nor an HDF5 file.
    IncompleteStoreError
        The writing job did not finish.
    """
    loc = Location.of(path_or_url, storage_options)
    loc.require()
    if loc.is_hdf5_file():
        from diffdask.io.hdf5 import open_hdf5

        return open_hdf5(loc.url, chunks=chunks)
    if not _is_zarr_group(loc):
        raise StoreFormatError(
            f"{loc.url!r} is neither a Zarr v3 store (no zarr.json) nor an HDF5 file. Convert HDF5/CXI "
            "data with `diffdask ingest SRC STORE`; Zarr v2 stores can be rewritten with save_frames."
        )
    ds = _open_dataset(loc, "", allow_incomplete, chunks)
    return validate(ds)


def open_results(path_or_url: Any, group: str, **storage_options: Any) -> xr.Dataset:
    """Open the results stored in ``results/<group>`` of a frame-stack store, lazily."""
    loc = Location.of(path_or_url, storage_options)
    path = _results_path(group)
    loc.require()
    if not loc.fs.exists(loc.join(path, "zarr.json")):
        raise StoreFormatError(
            f"{loc.url!r} has no result {group!r}; it has {list_results(loc) or 'none'}."
        )
    return _open_dataset(loc, path, False, None)


def list_results(path_or_url: Any, **storage_options: Any) -> list[str]:
    """Names of the complete result groups stored beside the frames."""
    loc = Location.of(path_or_url, storage_options)
    root = _open_group(loc, "r")
    if RESULTS_GROUP not in root:
        return []
    names = []

    def walk(g: zarr.Group, prefix: str) -> None:
        for name, sub in g.groups():
            if name == BOOKKEEPING_GROUP:
                continue
            meta = sub.attrs.get(BOOKKEEPING_ATTR)
            if meta is not None and meta.get("complete"):
                names.append(prefix + name)
            walk(sub, prefix + name + "/")

    walk(root[RESULTS_GROUP], "")
    return sorted(names)


def store_info(path_or_url: Any, **storage_options: Any) -> dict[str, Any]:
    """Summary of a frame-stack store, read from metadata and file sizes only.

    Returns
    -------
    dict
        ``url``, ``n_frames``, ``frame_shape``, ``dtype``, ``batch_frames`` (frames per shard and
        per Dask chunk), ``inner_frames``, ``codecs``, ``nbytes`` (uncompressed),
        ``stored_bytes``, ``compression_ratio``, ``complete``, ``n_nonfinite_pixels``,
        ``geometry`` (attrs or None), ``per_frame`` (name → dims, dtype), ``results``.
    """
    from diffdask.frames import get_geometry

    loc = Location.of(path_or_url, storage_options)
    loc.require()
    if not _is_zarr_group(loc):
        raise StoreFormatError(f"{loc.url!r} is not a Zarr v3 store (no zarr.json).")
    root = _open_group(loc, "r")
    if "frames" not in root:
        raise SchemaError(f"{loc.url!r} holds no 'frames' array; it is not a diffdask frame stack.")
    frames = root["frames"]
    meta = root.attrs.get(BOOKKEEPING_ATTR) or {}
    ds = _open_dataset(loc, "", True, None)
    geometry = get_geometry(ds)
    stored = loc.stored_bytes("frames")
    per_frame = {
        str(n): {"dims": list(map(str, v.dims)), "dtype": str(v.dtype)}
        for n, v in ds.variables.items()
        if "frame" in v.dims and n != "frames"
    }
    return {
        "url": loc.url,
        "n_frames": int(frames.shape[0]),
        "frame_shape": tuple(int(s) for s in frames.shape[1:]),
        "dtype": str(frames.dtype),
        "batch_frames": int(frames.shards[0]) if frames.shards else int(frames.chunks[0]),
        "inner_frames": int(frames.chunks[0]),
        "codecs": [type(c).__name__ for c in frames.compressors],
        "nbytes": int(frames.nbytes),
        "stored_bytes": stored,
        "compression_ratio": frames.nbytes / stored if stored else float("nan"),
        "complete": bool(meta.get("complete", True)),
        "n_nonfinite_pixels": int(meta.get("n_nonfinite_pixels", 0)),
        "geometry": geometry.to_attrs() if geometry else None,
        "has_mask": "mask" in ds.variables,
        "per_frame": per_frame,
        "results": list_results(loc),
    }


def _check_batch(frames: _VerifiedFrames, index: int) -> dict[str, Any]:
    start, stop = index * frames.batch, min(frames.shape[0], (index + 1) * frames.batch)
    try:
        frames[start:stop]
    except (IncompleteStoreError, StoreFormatError) as err:
        status = "missing" if isinstance(err, IncompleteStoreError) else "corrupt"
        return {"batch": index, "frames": [start, stop - 1], "status": status, "error": str(err)}
    return {"batch": index, "frames": [start, stop - 1], "status": "ok", "error": ""}


def verify_store(path_or_url: Any, **storage_options: Any) -> list[dict[str, Any]]:
    """Read every frame shard of a store once and report which are missing or corrupt.

    The reads are Dask tasks, one per shard, on the current scheduler (a whole pass over the
    data). Use it after copying a store, or when a read has failed.

    Returns
    -------
    list of dict
        One entry per shard: ``batch``, ``frames`` ([first, last]), ``status`` ("ok",
        "missing" or "corrupt") and ``error`` (the message, empty when ok).

    Raises
    ------
    StoreNotFoundError, StoreFormatError, IncompleteStoreError
        As `open_frames`, for a store that cannot be opened at all.
    """
    ds = open_frames(path_or_url, **storage_options)
    loc = Location.of(path_or_url, storage_options)
    meta = ds.encoding.get("diffdask") or {}
    if not meta.get("every_shard_written"):
        raise StoreFormatError(
            f"{loc.url!r} was written by an older diffdask that skipped all-zero shards, so a missing "
            "shard cannot be told from an empty one; rewrite it with save_frames to verify it."
        )
    frames = _VerifiedFrames(loc, "frames", _open_group(loc, "r")["frames"], int(meta["layout"]["batch_frames"]))
    n_batches = -(-frames.shape[0] // frames.batch)
    checks = [dask.delayed(_check_batch, pure=False)(frames, i) for i in range(n_batches)]
    return list(dask.compute(*checks))


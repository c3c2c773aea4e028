"""Frame stacks and results in Zarr v3 stores: the layout, and verified lazy reads.

Layout of a store::

    zarr.json                  root group: dataset attrs (geometry, provenance), consolidated metadata
    frames/                    (frame, y, x), sharded along frame: one shard = one write batch
    mask/                      (y, x) bool
    <per-frame variables>/     (frame, ...), one chunk per write batch
    _diffdask/done             one entry per batch: -1 = not written, else its non-finite pixel count
    results/<name>/            result datasets aligned on frame, each with its own _diffdask/done

Reads verify what they read: a shard that is missing or does not decode is an error naming
its frames, never zeros. Writing lives in `diffdask.io.writer`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec

from diffdask.errors import (
    IncompleteStoreError,
    ParameterError,
    SchemaError,
    StoreFormatError,
)
from diffdask.frames import validate
from diffdask.io.hdf5 import open_hdf5
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


def _results_path(group: str) -> str:
    name = str(group).strip("/")
    if name.startswith(RESULTS_GROUP + "/"):
        name = name[len(RESULTS_GROUP) + 1 :]
    if not name or any(p in ("", ".", "..", BOOKKEEPING_GROUP) for p in name.split("/")):
        raise ParameterError(f"result group must be a plain name such as 'com' or 'psd', got {group!r}.")
    return f"{RESULTS_GROUP}/{name}"


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


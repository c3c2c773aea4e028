"""The Dask patterns every diffdask graph is built from, and the only hand-built graphs.

- `generate_frames`: a generator kernel per range of frame indices → new per-frame arrays
  (simulators: each chunk is made on its worker from the seed and its frame range);
- `map_frames`: a kernel per chunk of frames → per-frame outputs (one read of each chunk
  feeds every output of the kernel, so several reductions share one pass over the data);
- `reduce_frames`: a kernel per chunk → partial results → a tree reduction in a fixed order;
- `pair_blocks`: a kernel per (block i, block j) → a blocked 2-D matrix, with only the i ≤ j
  tiles computed when the matrix is symmetric.

Kernels are plain functions of NumPy/CuPy blocks that return a dict of arrays, one per
declared output. Keyword arguments (masks, weight matrices) are stored once in the graph,
not once per task, so a detector-sized operator costs one transfer per worker.

All four are built on Dask's public API: a `dask.array.blockwise` layer whose tasks return
the kernel's dict (one object per chunk), then one `map_blocks` per output picking its entry;
the tree reduction and the tiles of a pair matrix are `dask.delayed` calls. Being blockwise,
the kernel layer fuses with the layer that reads the chunk (`da.from_array`, `xr.open_zarr`,
HDF5), so a stored chunk is read, decoded and reduced in one task, and computing several
outputs together still runs the kernel once per chunk.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed

from diffdask.errors import ParameterError

#: An output declaration: (shape after the leading axis/axes, dtype).
OutputSpec = tuple[tuple[int, ...], Any]
Kernel = Callable[..., Mapping[str, Any]]


def generate_frames(
    kernel: Kernel,
    n_frames: int,
    chunk_frames: int,
    outputs: Mapping[str, OutputSpec],
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> dict[str, da.Array]:
    """Lazy per-frame arrays made by a generator kernel from frame-index ranges.

    Parameters
    ----------
    kernel : callable
        ``kernel(start, stop, **kwargs) -> {name: array of shape (stop - start,) + tail}``;
        it makes frames ``start, ..., stop - 1``. A deterministic kernel that derives its
        randomness from the frame indices (not from the chunk) gives the same bytes for any
        ``chunk_frames`` and any number of workers.
    n_frames : int
        Number of frames (≥ 1).
    chunk_frames : int
        Frames per task and per Dask chunk (≥ 1); only the chunks being written are ever
        held in memory.
    outputs : mapping
        ``{name: (tail_shape, dtype)}`` for each array the kernel returns.
    kwargs : mapping, optional
        Keyword arguments of the kernel (geometry maps, precomputed volumes), stored once in
        the graph.
    name : str, optional
        Prefix of the task names.

    Returns
    -------
    dict of str to dask.array.Array
        One array per output, shape ``(n_frames,) + tail``, chunked ``chunk_frames`` along
        the first axis. Computing several of them together runs the kernel once per chunk.
    """
    try:
        n_frames, chunk_frames = int(n_frames), int(chunk_frames)
    except (TypeError, ValueError):
        raise ParameterError(
            f"n_frames and chunk_frames must be integers, got {n_frames!r}, {chunk_frames!r}."
        ) from None
    if n_frames < 1 or chunk_frames < 1:
        raise ParameterError(f"n_frames and chunk_frames must be ≥ 1, got {n_frames}, {chunk_frames}.")
    specs = _check_outputs(outputs)
    _check_size(n_frames, chunk_frames, specs)
    kwargs = dict(kwargs or {})
    prefix = name or getattr(kernel, "__name__", "generate")
    token = tokenize(kernel, n_frames, chunk_frames, specs, kwargs)
    bounds = tuple((s, min(s + chunk_frames, n_frames)) for s in range(0, n_frames, chunk_frames))
    spec = _spec(prefix, token, kernel, tuple(specs), bounds, kwargs)
    packed = da.map_blocks(
        _generate_call, spec, name=f"{prefix}-{token}", chunks=((1,) * len(bounds),), dtype=object,
        meta=np.empty((0,), dtype=object),
    )
    return _unpack(packed, tuple(b - a for a, b in bounds), None, specs, prefix, token)


def _spec(prefix: str, token: str, *spec: Any) -> Delayed:
    # The kernel and its parameters, stored once as their own graph node; each task refers
    # to it, so a detector-sized parameter travels once per worker, and the key is
    # deterministic (Dask would give a large constant a random one).
    return dask.delayed(spec, name=f"{prefix}-kwargs-{token}", pure=True, traverse=False)


def _generate_call(spec: tuple, block_info: Mapping[Any, Any] | None = None) -> np.ndarray:
    kernel, names, bounds, kw = spec
    start, stop = bounds[block_info[None]["chunk-location"][0]]
    return _box(_checked_call(kernel, names, start, stop, **kw), 1)


#: Most tasks one generated array may have: the graph is built in the client's memory
#: (about 1 KiB per task), so 10⁶ tasks already take about a GiB.
MAX_TASKS = 1_000_000


def _check_size(n_frames: int, chunk_frames: int, specs: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Refuse, before any work, a job whose graph or chunks cannot fit in memory."""
    n_chunks = -(-n_frames // chunk_frames)
    if n_chunks > MAX_TASKS:
        raise ParameterError(
            f"{n_frames:,} frames in chunks of {chunk_frames:,} make {n_chunks:,} tasks, more than the "
            f"{MAX_TASKS:,} a graph can hold in memory; use larger chunks or split the job into runs of at "
            f"most {MAX_TASKS * chunk_frames:,} frames."
        )
    chunk_bytes = min(chunk_frames, n_frames) * sum(
        int(np.prod(tail, dtype=np.float64)) * dtype.itemsize for tail, dtype in specs.values()
    )
    check_fits_in_memory(
        chunk_bytes, f"one chunk of {min(chunk_frames, n_frames):,} frames", "use fewer frames per chunk or a smaller detector"
    )


def check_fits_in_memory(nbytes: float, what: str, fix: str) -> None:
    """Raise `ParameterError` before any work when ``what`` needs over half the free memory.

    Parameters
    ----------
    nbytes : float
        Bytes ``what`` will allocate at once.
    what, fix : str
        What needs the memory, and how to need less (both go into the message).
    """
    import psutil

    available = psutil.virtual_memory().available
    if nbytes > available / 2:
        raise ParameterError(
            f"{what} needs {nbytes / 2**30:,.1f} GiB, more than half the {available / 2**30:,.1f} GiB of memory "
            f"available here; {fix}."
        )


def _frame_blocks(frames: da.Array) -> da.Array:
    if not isinstance(frames, da.Array):
        raise ParameterError(f"expected a dask array of frames, got {type(frames).__name__}.")
    if frames.ndim < 1:
        raise ParameterError("a frame array needs a leading frame axis.")
    return frames.rechunk({i: -1 for i in range(1, frames.ndim)})


def _check_outputs(outputs: Mapping[str, OutputSpec]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    if not outputs:
        raise ParameterError("declare at least one output: {name: (tail_shape, dtype)}.")
    return {name: (tuple(int(s) for s in shape), np.dtype(dtype)) for name, (shape, dtype) in outputs.items()}


def _meta(like: da.Array, ndim: int, dtype: np.dtype) -> Any:
    return da.utils.meta_from_array(like._meta, ndim=ndim, dtype=dtype)


def _checked_call(kernel: Kernel, names: Sequence[str], *args: Any, **kwargs: Any) -> dict[str, Any]:
    result = kernel(*args, **kwargs)
    missing = [n for n in names if n not in result]
    if missing:
        raise ParameterError(
            f"kernel {getattr(kernel, '__name__', kernel)!r} did not return outputs {missing}; "
            f"it returned {sorted(result)}."
        )
    return result


def _box(result: Mapping[str, Any], ndim: int) -> np.ndarray:
    # One object per chunk: the kernel's dict rides through the array layer unchanged.
    out = np.empty((1,) * ndim, dtype=object)
    out.flat[0] = result
    return out


def _map_call(spec: tuple, block: Any, *extra: Any) -> np.ndarray:
    kernel, names, extra_names, pass_offset, kw = spec
    kwargs = dict(kw, **dict(zip(extra_names, extra[1:] if pass_offset else extra)))
    if pass_offset:
        kwargs["frame_offset"] = int(extra[0][0])
    return _box(_checked_call(kernel, names, block, **kwargs), block.ndim)


def _packed(call: Callable[..., np.ndarray], name: str, spec: Delayed, arrays: Sequence[da.Array]) -> da.Array:
    """``call(spec, block, *blocks)`` per chunk along the first axis, as an object array.

    Every array is cut along its first axis like the first one and passed whole along the
    others (each must already be one chunk there). The result has the first array's number
    of dimensions, one object per chunk: the same index as the first array, which is what
    lets Dask fuse this layer with the one that reads it.
    """
    lead = arrays[0]
    out_index = string.ascii_letters[: lead.ndim]
    args: list[Any] = [spec, None, lead, out_index]
    for k, a in enumerate(arrays[1:]):
        start = lead.ndim + 8 * k
        args += [a, "a" + string.ascii_letters[start : start + a.ndim - 1]]
    return da.blockwise(
        call, out_index, *args, name=name, dtype=object, concatenate=True,
        adjust_chunks=dict.fromkeys(out_index, 1), meta=np.empty((0,) * lead.ndim, dtype=object),
    )


def _pick(packed: np.ndarray, name: str) -> Any:
    return packed.flat[0][name]


def _unpack(
    packed: da.Array, chunks0: tuple[int, ...], like: da.Array | None,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]], prefix: str, token: str,
) -> dict[str, da.Array]:
    """One array per output, chunked ``chunks0`` along the first axis, of the NumPy/CuPy kind of ``like``."""
    result = {}
    for out, (tail, dtype) in specs.items():
        meta = np.empty((0,) * (1 + len(tail)), dtype=dtype) if like is None else _meta(like, 1 + len(tail), dtype)
        result[out] = da.map_blocks(
            _pick, packed, out, name=f"{prefix}-{out}-{token}", dtype=dtype,
            chunks=(chunks0,) + tuple((n,) for n in tail), drop_axis=list(range(1, packed.ndim)),
            new_axis=list(range(1, 1 + len(tail))), meta=meta,
        )
    return result


def _aligned(frames: da.Array, per_frame: Mapping[str, Any]) -> dict[str, da.Array]:
    # Per-frame arrays cut into the frames' chunks, so block i of each meets frame block i.
    out = {}
    for key, value in per_frame.items():
        arr = value if isinstance(value, da.Array) else da.asarray(value)
        if arr.ndim < 1 or arr.shape[0] != frames.shape[0]:
            raise ParameterError(
                f"per-frame array {key!r} has shape {arr.shape}; it needs {frames.shape[0]} rows, one per frame."
            )
        out[key] = arr.rechunk((frames.chunks[0],) + tuple((n,) for n in arr.shape[1:]))
    return out


def map_frames(
    kernel: Kernel,
    frames: da.Array,
    outputs: Mapping[str, OutputSpec],
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    pass_offset: bool = False,
    per_frame: Mapping[str, da.Array] | None = None,
) -> dict[str, da.Array]:
    """Apply ``kernel`` to each chunk of frames; return lazy per-frame outputs.

    Parameters
    ----------
    kernel : callable
        ``kernel(block, **kwargs) -> {name: array of shape (n,) + tail}`` for a block of ``n``
        frames.
    frames : dask.array.Array, shape (n_frames, ...)
        Chunked along the first axis (other axes are merged into one chunk).
    outputs : mapping
        ``{name: (tail_shape, dtype)}`` for each array the kernel returns.
    kwargs : mapping, optional
        Keyword arguments of the kernel, stored once in the graph.
    name : str, optional
        Prefix of the task names (shown on the dashboard).
    pass_offset : bool
        Also pass ``frame_offset=`` (index of the chunk's first frame in the stack) to the
        kernel, e.g. to lay frames out the same way whatever the chunking.
    per_frame : mapping of str to dask.array.Array, optional
        Arrays aligned on the frame axis (e.g. a starting value per frame), rechunked like
        ``frames``; the kernel gets the matching rows of each as a keyword argument.

    Returns
    -------
    dict of str to dask.array.Array
        One array per output, shape ``(n_frames,) + tail``, chunked like ``frames``. Computing
        several of them together reads each chunk once.
    """
    frames = _frame_blocks(frames)
    specs = _check_outputs(outputs)
    kwargs = dict(kwargs or {})
    extras = _aligned(frames, per_frame or {})
    prefix = name or getattr(kernel, "__name__", "kernel")
    token = tokenize(kernel, frames, specs, kwargs, pass_offset, extras)
    arrays = [frames]
    if pass_offset:
        # The frame index, cut like the frames: its first entry in a block is the block's offset.
        arrays.append(da.arange(frames.shape[0], chunks=(frames.chunks[0],)))
    arrays += list(extras.values())
    spec = _spec(prefix, token, kernel, tuple(specs), tuple(extras), pass_offset, kwargs)
    packed = _packed(_map_call, f"{prefix}-{token}", spec, arrays)
    return _unpack(packed, frames.chunks[0], frames, specs, prefix, token)


def _sum_partials(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    # Inputs are never modified (a recomputed task must see them unchanged); the first sum
    # allocates the result and the rest add into it, one pass per partial.
    if len(parts) == 1:
        return dict(parts[0])
    total = {k: v + parts[1][k] for k, v in parts[0].items()}
    for p in parts[2:]:
        for k, v in p.items():
            if isinstance(total[k], np.ndarray) and total[k].shape == np.shape(v):
                total[k] += v
            else:
                total[k] = total[k] + v
    return total


def reduce_frames(
    kernel: Kernel,
    frames: da.Array,
    outputs: Mapping[str, OutputSpec],
    kwargs: Mapping[str, Any] | None = None,
    combine: Callable[[Sequence[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
    split_every: int = 8,
    name: str | None = None,
) -> dict[str, da.Array]:
    """Reduce over all frames: kernel per chunk, then a tree of ``combine`` in chunk order.

    Parameters
    ----------
    kernel : callable
        ``kernel(block, **kwargs) -> {name: partial array of shape tail}``.
    frames : dask.array.Array
        Chunked along the first axis.
    outputs : mapping
        ``{name: (shape, dtype)}`` of the reduced results.
    kwargs : mapping, optional
        Keyword arguments of the kernel, stored once in the graph.
    combine : callable, optional
        Merges a list of partial dicts into one; element-wise sum by default. It must be
        associative; partials are always combined in chunk order, so a given chunking gives
        the same bytes on any number of workers.
    split_every : int
        Fan-in of the tree (≥ 2).
    name : str, optional
        Prefix of the task names.

    Returns
    -------
    dict of str to dask.array.Array
        One single-chunk array per output.
    """
    frames = _frame_blocks(frames)
    specs = _check_outputs(outputs)
    kwargs = dict(kwargs or {})
    combine = combine or _sum_partials
    prefix = name or getattr(kernel, "__name__", "reduce")
    token = tokenize(kernel, frames, specs, kwargs, combine, split_every)
    packed = _packed(_reduce_call, f"{prefix}-partial0-{token}", _spec(prefix, token, kernel, tuple(specs), kwargs), [frames])
    boxes = list(packed.to_delayed().ravel())
    final = _tree(boxes, combine, split_every, f"{prefix}-partial", token, unbox=True)
    result = {}
    for out, (shape, dtype) in specs.items():
        value = dask.delayed(_pick_dict, pure=True)(final, out, dask_key_name=f"{prefix}-{out}-{token}")
        result[out] = da.from_delayed(value, shape, dtype=dtype, meta=_meta(frames, len(shape), dtype))
    return result


def _reduce_call(spec: tuple, block: Any) -> np.ndarray:
    kernel, names, kw = spec
    return _box(_checked_call(kernel, names, block, **kw), block.ndim)


def _pick_dict(result: Mapping[str, Any], name: str) -> Any:
    return result[name]


def _combine_boxes(combine: Callable[[Sequence[Any]], Any], boxes: Sequence[np.ndarray]) -> Any:
    return combine([b.flat[0] for b in boxes])


def _tree(
    level: list[Any], combine: Callable[[Sequence[Any]], Any], split_every: int, prefix: str | None, token: str,
    unbox: bool = False,
) -> Delayed:
    """Partials combined ``split_every`` at a time, in list order, until one is left.

    With ``unbox`` the first level takes the one-object chunks of `_packed` and always runs,
    so even a single partial comes out as the kernel's dict.
    """
    if int(split_every) < 2:
        raise ParameterError(f"split_every must be ≥ 2, got {split_every}.")
    if not level:
        raise ParameterError("a tree reduction needs at least one partial result.")
    depth = 0
    while len(level) > 1 or (unbox and depth == 0):
        depth += 1
        groups = [level[j : j + split_every] for j in range(0, len(level), split_every)]
        first = unbox and depth == 1
        level = [
            dask.delayed(_combine_boxes if first else combine, pure=True)(
                *((combine,) if first else ()), group,
                dask_key_name=None if prefix is None else f"{prefix}{depth}-{token}-{j}",
            )
            for j, group in enumerate(groups)
        ]  # fmt: skip
    return level[0]


def tree_combine(
    parts: Sequence[Any],
    combine: Callable[[Sequence[Any]], Any] | None = None,
    split_every: int = 8,
) -> Any:
    """Combine lazy partial results (``dask.delayed`` objects) in a tree, in list order.

    For iterative algorithms whose per-chunk state lives in persisted delayed objects rather
    than a Dask array (EMC keeps sparse photon chunks on the workers).

    Parameters
    ----------
    parts : sequence of dask.delayed.Delayed
        Partial results, each a dict of arrays for the default ``combine``.
    combine : callable, optional
        Merges a list of partials; element-wise sum of dicts by default.
    split_every : int
        Fan-in of the tree (≥ 2).

    Returns
    -------
    dask.delayed.Delayed
    """
    return _tree(list(parts), combine or _sum_partials, split_every, None, "")


def _swap_leading(x: Any) -> Any:
    return x.swapaxes(0, 1)


def pair_blocks(
    kernel: Callable[..., Mapping[str, Any]],
    a: da.Array,
    outputs: Mapping[str, OutputSpec],
    b: da.Array | None = None,
    kwargs: Mapping[str, Any] | None = None,
    mirror: Mapping[str, Callable[[Any], Any]] | None = None,
    name: str | None = None,
) -> dict[str, da.Array]:
    """A blocked matrix from a kernel over pairs of blocks of ``a`` (and ``b``).

    Parameters
    ----------
    kernel : callable
        ``kernel(block_i, block_j, **kwargs) -> {name: array of shape (n_i, n_j) + tail}``.
    a : dask.array.Array, shape (M, ...)
        Items along the first axis, chunked along it.
    outputs : mapping
        ``{name: (tail_shape, dtype)}`` of each tile output.
    b : dask.array.Array, optional
        Second operand, shape (N, ...). When omitted the matrix is of ``a`` with itself and
        is taken as symmetric: only tiles with i ≤ j run; a tile j < i is ``mirror`` of
        tile (j, i) — by default its two leading axes swapped.
    kwargs : mapping, optional
        Keyword arguments of the kernel, stored once in the graph.
    mirror : mapping of str to callable, optional
        Per output, how tile (i, j) becomes tile (j, i) (e.g. also swap an angle pair).
    name : str, optional
        Prefix of the task names.

    Returns
    -------
    dict of str to dask.array.Array
        One array per output, shape ``(M, N) + tail``, chunked ``(a.chunks[0], b.chunks[0])``.
    """
    symmetric = b is None
    a = _frame_blocks(a)
    b = a if symmetric else _frame_blocks(b)
    specs = _check_outputs(outputs)
    kwargs = dict(kwargs or {})
    mirror = dict(mirror or {})
    unknown = set(mirror) - set(specs)
    if unknown:
        raise ParameterError(f"mirror names outputs {sorted(unknown)} that are not declared.")
    prefix = name or getattr(kernel, "__name__", "pairs")
    token = tokenize(kernel, a, b, specs, kwargs, symmetric, mirror)
    spec = _spec(prefix, token, kernel, tuple(specs), kwargs)
    blocks_a = list(a.to_delayed().reshape(a.numblocks[0]))
    blocks_b = blocks_a if symmetric else list(b.to_delayed().reshape(b.numblocks[0]))
    tiles = {
        (i, j): dask.delayed(_pair_call, pure=True)(spec, blocks_a[i], blocks_b[j], dask_key_name=f"{prefix}-{token}-{i}-{j}")
        for i in range(len(blocks_a))
        for j in range(i if symmetric else 0, len(blocks_b))
    }
    result = {}
    for out, (tail, dtype) in specs.items():
        flip = mirror.get(out, _swap_leading)
        meta = _meta(a, 2 + len(tail), dtype)
        rows = []
        for i, ni in enumerate(a.chunks[0]):
            row = []
            for j, nj in enumerate(b.chunks[0]):
                lower = symmetric and j < i
                tile = dask.delayed(_pair_tile, pure=True)(
                    tiles[(j, i) if lower else (i, j)], out, flip if lower else None,
                    dask_key_name=f"{prefix}-{out}-{token}-{i}-{j}",
                )
                row.append(da.from_delayed(tile, (ni, nj) + tail, dtype=dtype, meta=meta))
            rows.append(da.concatenate(row, axis=1))
        result[out] = da.concatenate(rows, axis=0)
    return result


def _pair_call(spec: tuple, block_a: Any, block_b: Any) -> dict[str, Any]:
    kernel, names, kw = spec
    return _checked_call(kernel, names, block_a, block_b, **kw)


def _pair_tile(tile: Mapping[str, Any], name: str, flip: Callable[[Any], Any] | None) -> Any:
    return tile[name] if flip is None else flip(tile[name])

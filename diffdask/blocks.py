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
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask._task_spec import DataNode, GraphNode, List, Task, TaskRef
from dask.base import tokenize
from dask.core import istask
from dask.highlevelgraph import HighLevelGraph
from dask.utils import apply

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
    kname, kwname = f"{prefix}-{token}", f"{prefix}-kwargs-{token}"
    starts = list(range(0, n_frames, chunk_frames))
    chunks0 = tuple(min(chunk_frames, n_frames - s) for s in starts)
    names = list(specs)
    layer: dict[Any, Any] = {kwname: kwargs}
    for i, start in enumerate(starts):
        layer[(kname, i)] = (apply, _checked_call, [kernel, names, start, start + chunks0[i]], kwname)
    graph = HighLevelGraph({kname: layer}, {kname: set()})
    result = {}
    for out, (tail, dtype) in specs.items():
        oname = f"{prefix}-{out}-{token}"
        zeros = (0,) * len(tail)
        olayer = {(oname, i) + zeros: (operator.getitem, (kname, i), out) for i in range(len(starts))}
        g = HighLevelGraph.merge(graph, HighLevelGraph({oname: olayer}, {oname: {kname}}))
        chunks = (chunks0,) + tuple((s,) for s in tail)
        result[out] = da.Array(g, oname, chunks, meta=np.empty((0,) * (1 + len(tail)), dtype=dtype))
    return result


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


def _block_call(
    kernel: Kernel, names: Sequence[str], offset: int | None, extra_names: Sequence[str], block: Any, *extra: Any,
    **kwargs: Any,
) -> dict[str, Any]:
    if offset is not None:
        kwargs["frame_offset"] = offset
    return _checked_call(kernel, names, block, **dict(zip(extra_names, extra)), **kwargs)


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
    kname, kwname = f"{prefix}-{token}", f"{prefix}-kwargs-{token}"
    inner = (0,) * (frames.ndim - 1)
    names = list(specs)
    extra_names = list(extras)
    layer: dict[Any, Any] = {kwname: DataNode(kwname, kwargs)}
    starts = np.cumsum((0,) + frames.chunks[0][:-1])
    source = frames.__dask_graph__()
    for i in range(frames.numblocks[0]):
        block = _read_inline(source, (frames.name, i) + inner)
        offset = int(starts[i]) if pass_offset else None
        extra_blocks = [TaskRef((a.name, i) + (0,) * (a.ndim - 1)) for a in extras.values()]
        layer[(kname, i)] = Task(
            (kname, i), apply, _block_call, List(kernel, names, offset, extra_names, block, *extra_blocks),
            TaskRef(kwname),
        )  # fmt: skip
    graph = HighLevelGraph.from_collections(kname, layer, dependencies=[frames, *extras.values()])
    result = {}
    for out, (tail, dtype) in specs.items():
        oname = f"{prefix}-{out}-{token}"
        zeros = (0,) * len(tail)
        olayer = {(oname, i) + zeros: (operator.getitem, (kname, i), out) for i in range(frames.numblocks[0])}
        g = HighLevelGraph.merge(graph, HighLevelGraph({oname: olayer}, {oname: {kname}}))
        chunks = (frames.chunks[0],) + tuple((s,) for s in tail)
        result[out] = da.Array(g, oname, chunks, meta=_meta(frames, 1 + len(tail), dtype))
    return result


#: Dask's readers of stored arrays (`da.from_array`, `xr.open_zarr`, HDF5).
_GETTERS = (da.core.getter, da.core.getter_nofancy, da.core.getter_inline)


def _read_inline(graph: Mapping[Any, Any], key: Any) -> Any:
    """The task that reads block ``key`` from its store, to run inside the kernel's task.

    A chunk read from Zarr or HDF5 is then decoded and reduced in one task: no decoded
    frame block is handed between tasks or held by the scheduler. Anything else (persisted or
    computed frames) stays a reference to its own task.
    """
    task = graph.get(key)
    if isinstance(task, Task) and task.func in _GETTERS:
        if all(_is_data(graph.get(dep)) for dep in task.dependencies):
            return task
    return TaskRef(key)


def _is_data(node: Any) -> bool:
    # A stored array's handle: a DataNode, or a raw value in a legacy graph (not a task).
    return isinstance(node, DataNode) or not (isinstance(node, GraphNode) or istask(node))


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
    if int(split_every) < 2:
        raise ParameterError(f"split_every must be ≥ 2, got {split_every}.")
    frames = _frame_blocks(frames)
    specs = _check_outputs(outputs)
    kwargs = dict(kwargs or {})
    combine = combine or _sum_partials
    prefix = name or getattr(kernel, "__name__", "reduce")
    token = tokenize(kernel, frames, specs, kwargs, combine, split_every)
    kwname = f"{prefix}-kwargs-{token}"
    inner = (0,) * (frames.ndim - 1)
    names = list(specs)
    level_name = f"{prefix}-partial0-{token}"
    layer: dict[Any, Any] = {kwname: kwargs}
    keys = []
    for i in range(frames.numblocks[0]):
        layer[(level_name, i)] = (apply, _checked_call, [kernel, names, (frames.name, i) + inner], kwname)
        keys.append((level_name, i))
    depth = 0
    while len(keys) > 1:
        depth += 1
        level_name = f"{prefix}-partial{depth}-{token}"
        groups = [keys[j : j + split_every] for j in range(0, len(keys), split_every)]
        keys = []
        for j, group in enumerate(groups):
            layer[(level_name, j)] = (combine, list(group))
            keys.append((level_name, j))
    final = keys[0]
    graph = HighLevelGraph.from_collections(f"{prefix}-{token}", layer, dependencies=[frames])
    result = {}
    for out, (shape, dtype) in specs.items():
        oname = f"{prefix}-{out}-{token}"
        olayer = {(oname,) + (0,) * len(shape): (operator.getitem, final, out)}
        g = HighLevelGraph.merge(graph, HighLevelGraph({oname: olayer}, {oname: {f"{prefix}-{token}"}}))
        chunks = tuple((s,) for s in shape)
        result[out] = da.Array(g, oname, chunks, meta=_meta(frames, len(shape), dtype))
    return result


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
    import dask

    if int(split_every) < 2:
        raise ParameterError(f"split_every must be ≥ 2, got {split_every}.")
    if not parts:
        raise ParameterError("tree_combine needs at least one partial result.")
    combine = combine or _sum_partials
    level = list(parts)
    while len(level) > 1:
        level = [dask.delayed(combine)(level[j : j + split_every]) for j in range(0, len(level), split_every)]
    return level[0]


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
    kname, kwname = f"{prefix}-{token}", f"{prefix}-kwargs-{token}"
    ia, ib = (0,) * (a.ndim - 1), (0,) * (b.ndim - 1)
    names = list(specs)
    layer: dict[Any, Any] = {kwname: kwargs}
    nb_a, nb_b = a.numblocks[0], b.numblocks[0]
    for i in range(nb_a):
        for j in range(i if symmetric else 0, nb_b):
            layer[(kname, i, j)] = (
                apply,
                _checked_call,
                [kernel, names, (a.name, i) + ia, (b.name, j) + ib],
                kwname,
            )
    deps = [a] if symmetric else [a, b]
    graph = HighLevelGraph.from_collections(kname, layer, dependencies=deps)
    result = {}
    for out, (tail, dtype) in specs.items():
        oname = f"{prefix}-{out}-{token}"
        flip = mirror.get(out, _swap_leading)
        zeros = (0,) * len(tail)
        olayer: dict[Any, Any] = {}
        for i in range(nb_a):
            for j in range(nb_b):
                if symmetric and j < i:
                    olayer[(oname, i, j) + zeros] = (flip, (operator.getitem, (kname, j, i), out))
                else:
                    olayer[(oname, i, j) + zeros] = (operator.getitem, (kname, i, j), out)
        g = HighLevelGraph.merge(graph, HighLevelGraph({oname: olayer}, {oname: {kname}}))
        chunks = (a.chunks[0], b.chunks[0]) + tuple((s,) for s in tail)
        result[out] = da.Array(g, oname, chunks, meta=_meta(a, 2 + len(tail), dtype))
    return result

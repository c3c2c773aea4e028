"""The three Dask patterns against direct NumPy computation, in memory and on a cluster."""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np
import pytest

from diffdask import ParameterError, generate_frames, map_frames, pair_blocks, reduce_frames

RNG = np.random.default_rng(7)
FRAMES = RNG.random((53, 6, 5))


def _stats(block, weight):
    return {
        "total": (block * weight).sum(axis=(1, 2)),
        "peak": block.max(axis=(1, 2)).astype("float32"),
        "rows": block.sum(axis=2),
    }


SPECS = {"total": ((), "float64"), "peak": ((), "float32"), "rows": ((6,), "float64")}


@pytest.mark.parametrize("chunks", [53, 10, 7, 1])
def test_map_frames_equals_numpy_for_any_chunking(chunks):
    weight = RNG.random((6, 5))
    out = map_frames(_stats, da.from_array(FRAMES, chunks=(chunks, 3, 5)), SPECS, kwargs={"weight": weight})
    total, peak, rows = dask.compute(out["total"], out["peak"], out["rows"])
    assert np.allclose(total, (FRAMES * weight).sum(axis=(1, 2)))
    assert peak.dtype == np.float32 and np.array_equal(peak, FRAMES.max(axis=(1, 2)).astype("float32"))
    assert rows.shape == (53, 6) and np.allclose(rows, FRAMES.sum(axis=2))
    assert out["rows"].chunks[0] == da.from_array(FRAMES, chunks=chunks).chunks[0]


def test_map_frames_reads_each_chunk_once_for_all_outputs():
    calls = []

    def counting(block, weight):
        calls.append(block.shape[0])
        return _stats(block, weight)

    out = map_frames(counting, da.from_array(FRAMES, chunks=10), SPECS, kwargs={"weight": np.ones((6, 5))})
    dask.compute(*out.values(), scheduler="sync")
    assert sorted(calls) == sorted([10] * 5 + [3])


def test_map_frames_stores_kwargs_once_in_the_graph():
    import pickle

    weight = RNG.random((6, 5))
    out = map_frames(_stats, da.from_array(FRAMES, chunks=5), SPECS, kwargs={"weight": weight})
    graph = dict(out["total"].__dask_graph__())
    # What a worker receives per task is the pickled task: the weights must be in one node only.
    holders = [k for k, v in graph.items() if weight.tobytes() in pickle.dumps(v)]
    assert len(holders) == 1 and out["total"].numblocks[0] == 11
    assert np.allclose(out["total"].compute(), (FRAMES * weight).sum(axis=(1, 2)))


def test_kernel_missing_an_output_is_a_clear_error():
    out = map_frames(lambda b: {"total": b.sum(axis=(1, 2))}, da.from_array(FRAMES, chunks=20), SPECS)
    with pytest.raises(ParameterError, match="did not return outputs"):
        out["peak"].compute(scheduler="sync")


@pytest.mark.parametrize("chunks, split_every", [(53, 2), (5, 2), (4, 3), (1, 8)])
def test_reduce_frames_equals_numpy(chunks, split_every):
    def partial(block):
        return {"sum": block.sum(axis=0), "sumsq": (block**2).sum(axis=0), "n": np.array(block.shape[0])}

    out = reduce_frames(
        partial,
        da.from_array(FRAMES, chunks=chunks),
        {"sum": ((6, 5), "float64"), "sumsq": ((6, 5), "float64"), "n": ((), "int64")},
        split_every=split_every,
    )
    s, ss, n = dask.compute(out["sum"], out["sumsq"], out["n"])
    assert n == 53
    assert np.allclose(s, FRAMES.sum(axis=0)) and np.allclose(ss, (FRAMES**2).sum(axis=0))


def test_reduce_frames_custom_combine_and_bad_fan_in():
    def partial(block):
        return {"max": block.max(axis=0)}

    def combine(parts):
        return {"max": np.maximum.reduce([p["max"] for p in parts])}

    out = reduce_frames(partial, da.from_array(FRAMES, chunks=6), {"max": ((6, 5), "float64")}, combine=combine)
    assert np.array_equal(out["max"].compute(), FRAMES.max(axis=0))
    with pytest.raises(ParameterError):
        reduce_frames(partial, da.from_array(FRAMES, chunks=6), {"max": ((6, 5), "float64")}, split_every=1)


def test_pair_blocks_symmetric_computes_only_the_upper_tiles():
    items = RNG.random((23, 4))
    calls = []

    def gram(a, b):
        calls.append((a.shape[0], b.shape[0]))
        return {"dot": a @ b.T, "lag": np.subtract.outer(a[:, 0], b[:, 0])}

    out = pair_blocks(
        gram,
        da.from_array(items, chunks=(7, 4)),
        {"dot": ((), "float64"), "lag": ((), "float64")},
        mirror={"lag": lambda t: -t.T},
    )
    dot, lag = dask.compute(out["dot"], out["lag"], scheduler="sync")
    assert np.allclose(dot, items @ items.T)
    assert np.allclose(lag, np.subtract.outer(items[:, 0], items[:, 0]))
    assert len(calls) == 4 * 5 // 2  # 4 blocks: 10 tiles with i <= j
    assert out["dot"].chunks == ((7, 7, 7, 2), (7, 7, 7, 2))


def test_pair_blocks_rectangular_and_errors():
    a, b = RNG.random((9, 3)), RNG.random((14, 3))
    out = pair_blocks(lambda x, y: {"d": x @ y.T}, da.from_array(a, chunks=4), {"d": ((), "float64")},
                      b=da.from_array(b, chunks=5))
    assert np.allclose(out["d"].compute(), a @ b.T)
    with pytest.raises(ParameterError, match="not declared"):
        pair_blocks(lambda x, y: {"d": x @ y.T}, da.from_array(a, chunks=4), {"d": ((), "float64")},
                    mirror={"angle": np.transpose})
    with pytest.raises(ParameterError, match="dask array"):
        map_frames(_stats, FRAMES, SPECS)


def _shifted(block, start, scale):
    return {"value": block.sum(axis=(1, 2)) * scale + start[:, 0] - start[:, 1]}


@pytest.mark.parametrize("frame_chunks, extra_chunks", [(10, 53), (7, 4), (1, 53)])
def test_map_frames_passes_aligned_per_frame_rows(frame_chunks, extra_chunks):
    start = RNG.random((53, 2))
    out = map_frames(_shifted, da.from_array(FRAMES, chunks=frame_chunks), {"value": ((), "f8")},
                     kwargs={"scale": 2.0}, per_frame={"start": da.from_array(start, chunks=(extra_chunks, 2))})
    assert np.allclose(out["value"].compute(), FRAMES.sum(axis=(1, 2)) * 2.0 + start[:, 0] - start[:, 1])


def test_map_frames_refuses_a_per_frame_array_of_another_length():
    with pytest.raises(ParameterError, match="one per frame"):
        map_frames(_shifted, da.from_array(FRAMES, chunks=10), {"value": ((), "f8")}, kwargs={"scale": 1.0},
                   per_frame={"start": np.zeros((52, 2))})


def test_patterns_run_on_a_distributed_cluster(client):
    weight = RNG.random((6, 5))
    out = map_frames(_stats, da.from_array(FRAMES, chunks=8), SPECS, kwargs={"weight": weight})
    assert np.allclose(out["total"].compute(), (FRAMES * weight).sum(axis=(1, 2)))
    red = reduce_frames(lambda b: {"s": b.sum(axis=0)}, da.from_array(FRAMES, chunks=8), {"s": ((6, 5), "f8")})
    assert np.allclose(red["s"].compute(), FRAMES.sum(axis=0))
    items = RNG.random((17, 3))
    pairs = pair_blocks(lambda x, y: {"d": x @ y.T}, da.from_array(items, chunks=5), {"d": ((), "f8")})
    assert np.allclose(pairs["d"].compute(), items @ items.T)
    start = RNG.random((53, 2))
    shifted = map_frames(_shifted, da.from_array(FRAMES, chunks=8), {"value": ((), "f8")}, kwargs={"scale": 1.0},
                         per_frame={"start": da.from_array(start, chunks=(20, 2))})
    assert np.allclose(shifted["value"].compute(), FRAMES.sum(axis=(1, 2)) + start[:, 0] - start[:, 1])


def test_jobs_too_big_for_memory_are_refused_before_any_work():
    def never(start, stop):
        raise AssertionError("no chunk may be made")

    with pytest.raises(ParameterError, match="tasks, more than"):
        generate_frames(never, 10**12, 1000, {"frames": ((128, 128), np.uint16)})
    with pytest.raises(ParameterError, match="GiB, more than half"):
        generate_frames(never, 10, 1, {"frames": ((200_000, 200_000), np.float32)})


def test_graph_keys_are_deterministic():
    # Two builds of the same computation give the same keys (no random names anywhere), so a
    # re-run hits the same results on a cluster and caches stay valid.
    def build():
        x = da.from_array(FRAMES, chunks=10)
        big = {"weight": np.ones((6, 5)), "order": list(range(20))}
        m = map_frames(_stats, x, SPECS, kwargs=big)["total"]
        r = reduce_frames(lambda b, weight, order: {"s": (b * weight).sum(axis=0)}, x, {"s": ((6, 5), "f8")},
                          kwargs=big)["s"]  # fmt: skip
        p = pair_blocks(lambda u, v: {"d": u.reshape(len(u), -1) @ v.reshape(len(v), -1).T}, x, {"d": ((), "f8")})
        g = generate_frames(lambda a, b: {"i": np.arange(a, b)}, 30, 7, {"i": ((), "i8")})["i"]
        return [sorted(map(str, dict(a.__dask_graph__()))) for a in (m, r, p["d"], g)]

    first, second = build(), build()
    assert first == second
    uuid = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
    assert not [k for keys in first for k in keys if uuid.search(k)]

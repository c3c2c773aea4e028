"""Per-frame reductions against the read floors and against peers, measured in one run.

On one synthetic stack (Poisson photons of a sphere pattern plus background, float32, with a
beamstop and a panel gap in the mask, beam off-centre) this measures:

(a) floors: one in-memory pass (``frames.sum()`` on the same Dask chunks and threads) and
    one pass reading the compressed Zarr store (`open_frames`, decompress + sum, and a pure
    read that decompresses and touches one pixel per frame, both through a Dask blockwise op
    and through `map_frames`; the fastest counts);
(b) diffdask `center_of_mass`, `radial_profile`, `lit_pixels`, `summarize` and `integrate1d`
    (q, Poisson errors), in memory (float32, and the same counts as uint16) and from the Zarr
    store;
(c) peers on the same frames, from the benchmark environment only
    (``benchmarks/setup_bench_env.sh``): LiberTEM ``CoMUDF`` and ``ApplyMasksUDF`` with one
    ring mask per radial bin (its 'threads' executor on all cores by default; the best of
    ``--libertem-executors``), pyFAI ``integrate1d`` per frame with the CSR engine (no
    pixel splitting, same bins, same mask; timed on a subset and scaled to all frames), and
    pyFAI's CSR matrix applied to the whole stack in one sparse product.

Throughputs are printed as frames/s and as ratios (against the floors and the peers).
Peers that are not installed are reported as missing, not skipped silently.

``--scale`` runs the end-to-end scale test instead: 10⁷ frames (``--n-frames``) of 128×128
uint16 Poisson photons written to a Zarr store with `save_frames` in bounded memory, then
``save_results(summarize(open_frames(store)))``, reporting wall times and peak memory (RSS).

Run: ``python benchmarks/reductions.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

import diffdask as dd
from diffdask.blocks import map_frames
from diffdask.io import open_frames, save_frames, save_results, store_info

GEOMETRY = dict(pixel_size_m=75e-6, distance_m=0.13, wavelength_m=0.729e-9)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call (CPU time is steadier on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def make_geometry(shape: tuple[int, int]) -> dd.Geometry:
    return dd.Geometry(shape, beam_center_yx=(shape[0] / 2 - 0.7, shape[1] / 2 + 0.4), **GEOMETRY)


def make_mask(geometry: dd.Geometry) -> np.ndarray:
    mask = geometry.radius_px > 3.0  # beamstop
    mid = geometry.shape[0] // 2 + 8
    mask[mid : mid + 2] = False  # panel gap
    return mask


def mean_pattern(geometry: dd.Geometry, photons: float, diameter_nm: float = 70.0) -> np.ndarray:
    """Expected photons per pixel: a sphere pattern with ``photons`` in total plus 0.01 background."""
    x = np.maximum(geometry.q_inv_nm * diameter_nm / 2.0, 1e-9)
    form = (3.0 * (np.sin(x) - x * np.cos(x)) / x**3) ** 2
    return photons * form / form.sum() + 0.01


def make_frames(n: int, geometry: dd.Geometry, photons: float, dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = mean_pattern(geometry, photons)
    out = np.empty((n, *geometry.shape), dtype=dtype)
    for start in range(0, n, 1000):  # bounded temporaries
        stop = min(n, start + 1000)
        out[start:stop] = rng.poisson(mu, size=(stop - start, *mu.shape))
    return out


def _corner(block: np.ndarray, **_: Any) -> dict[str, np.ndarray]:
    return {"corner": block[:, 0, 0].copy()}


def diffdask_cases(ds: Any, threshold: float, read_floors: bool) -> dict[str, Callable[[], Any]]:
    """The diffdask reductions of a frame stack, each computed with the current scheduler.

    With ``read_floors`` (a store) the floor is also timed as a pure read — decompress and
    touch one pixel per frame — through a Dask blockwise op and through the same
    `map_frames` graph the reductions use; the fastest of the floors counts.
    """
    frames = ds.frames.data
    floors: dict[str, Callable[[], Any]] = {"floor: sum": lambda: frames.sum().compute()}
    if read_floors:
        floors["floor: read (map_blocks)"] = lambda: frames.map_blocks(
            lambda b: b[:, 0, 0].copy(), drop_axis=(1, 2), dtype=frames.dtype
        ).compute()
        floors["floor: read (map_frames)"] = lambda: map_frames(
            _corner, frames, {"corner": ((), frames.dtype)}
        )["corner"].compute()
    return {
        **floors,
        "center_of_mass": lambda: dd.center_of_mass(ds).compute(),
        "radial_profile": lambda: dd.radial_profile(ds).compute(),
        "lit_pixels": lambda: dd.lit_pixels(ds, threshold).compute(),
        "summarize": lambda: dd.summarize(ds, threshold=threshold, min_lit=20).compute(),
        "integrate1d (q, Poisson)": lambda: dd.integrate1d(ds, 100, error_model="poisson").compute(),
    }


def libertem_cases(
    frames: np.ndarray, op: Any, stack: contextlib.ExitStack, executors: list[str]
) -> dict[str, Callable[[], Any]]:
    """LiberTEM CoMUDF and ring masks (one per radial bin) with each of its ``executors``."""
    import libertem.api as lt
    from libertem.udf.com import CoMUDF
    from libertem.udf.masks import ApplyMasksUDF

    # LiberTEM's CoMUDF warns about np.divide(where=...) on every partition.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"libertem\..*")
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    n = frames.shape[0]
    nav = (n // 100, 100) if n % 100 == 0 else (n,)  # a scan, so CoMUDF's field maps apply
    data = frames.reshape(*nav, *frames.shape[1:])
    bins = op.index
    factories = [(lambda k=k: (bins == k).astype(np.float32)) for k in range(op.n_bins)]
    cy, cx = op.center_yx
    cases = {}
    for executor in executors:
        ctx = stack.enter_context(lt.Context.make_with(executor, cpus=os.cpu_count()))
        lds = ctx.load("memory", data=data, sig_dims=2)

        def com(ctx=ctx, lds=lds) -> Any:
            return ctx.run_udf(dataset=lds, udf=CoMUDF.with_params(cy=cy, cx=cx))

        def rings(ctx=ctx, lds=lds) -> Any:
            return ctx.run_udf(dataset=lds, udf=ApplyMasksUDF(mask_factories=factories))

        cases[f"LiberTEM CoMUDF ({executor})"] = com
        cases[f"LiberTEM ring masks ({executor})"] = rings
    return cases


def pyfai_cases(
    frames: np.ndarray, mask: np.ndarray, op: Any, geometry: dd.Geometry, n_frames: int
) -> dict[str, Callable[[], Any]]:
    """pyFAI integrate1d on ``n_frames`` frames, one call per frame, CSR engine, same bins and mask;
    and pyFAI's CSR matrix applied to the whole stack at once (one sparse × dense product).

    Timed with OpenMP's default thread count and with one thread: on a loaded 2-core machine
    pyFAI's OpenMP loop was measured 10-20× slower with 2 threads than with 1, so both are
    run and its best counts.
    """
    from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    from threadpoolctl import threadpool_limits

    cy, cx = op.center_yx
    p = geometry.pixel_size_yx_m[0]
    ai = AzimuthalIntegrator(
        dist=geometry.distance_m,
        poni1=(cy + 0.5) * p,  # pyFAI puts pixel centres at index + 0.5
        poni2=(cx + 0.5) * p,
        pixel1=p,
        pixel2=p,
        wavelength=geometry.wavelength_m,
    )
    kwargs = dict(
        unit="r_mm",
        method=("no", "csr", "cython"),
        mask=~mask,
        radial_range=(0.0, op.n_bins * op.bin_width_px * p * 1e3),
        correctSolidAngle=False,
    )
    sub = frames[:n_frames]

    def run() -> None:
        for frame in sub:
            ai.integrate1d(frame, op.n_bins, **kwargs)

    def run_one_thread() -> None:
        with threadpool_limits(1, user_api="openmp"):
            run()

    ai.integrate1d(sub[0], op.n_bins, **kwargs)
    csr = _pyfai_csr(ai, frames.shape[1] * frames.shape[2])
    flat = frames.reshape(frames.shape[0], -1)
    ones = np.ones(flat.shape[1], dtype=np.float32)
    norm = csr @ ones

    def whole_stack() -> None:
        # pyFAI's engine computes signal = CSR·I and normalisation = CSR·1 per frame; here for
        # all frames in one product, as a user holding pyFAI's matrix would.
        with np.errstate(invalid="ignore", divide="ignore"):
            (csr @ flat.T).T / norm

    return {
        "pyFAI integrate1d (csr, OpenMP default)": run,
        "pyFAI integrate1d (csr, 1 thread)": run_one_thread,
        "pyFAI CSR matrix × whole stack": whole_stack,
    }


def _pyfai_csr(ai: Any, n_pixels: int) -> Any:
    """The CSR matrix (bins × pixels) of pyFAI's last 1-D CSR integration, as SciPy sparse."""
    import scipy.sparse as sp

    for engine in ai.engines.values():
        integrator = getattr(engine, "engine", None)
        lut = getattr(integrator, "lut", None)
        if lut is not None and len(lut) == 3:
            data, indices, indptr = (np.asarray(a) for a in lut)
            return sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(indptr) - 1, n_pixels))
    raise RuntimeError("pyFAI kept no CSR engine after integrate1d(method=('no', 'csr', 'cython')).")


def run_comparison(args: argparse.Namespace, work: Path) -> None:
    shape = tuple(args.shape)
    geometry = make_geometry(shape)
    mask = make_mask(geometry)
    t0 = time.perf_counter()
    frames = make_frames(args.n_frames, geometry, args.photons, "float32")
    print(f"# generated {args.n_frames} frames in {time.perf_counter() - t0:.1f} s")
    ds = dd.make_frame_stack(frames, mask=mask, geometry=geometry)
    store = work / "frames.zarr"
    save_frames(ds, store, overwrite=True)
    zds = open_frames(store)
    info = store_info(store)
    op = _bins(ds)
    n = args.n_frames
    ds16 = dd.make_frame_stack(frames.astype(np.uint16), mask=mask, geometry=geometry)
    cases: dict[tuple[str, str], Callable[[], Any]] = {}
    cases.update({("memory", k): f for k, f in diffdask_cases(ds, args.threshold, read_floors=False).items()})
    cases.update({("memory uint16", k): f for k, f in diffdask_cases(ds16, args.threshold, read_floors=False).items()})
    cases.update({("zarr", k): f for k, f in diffdask_cases(zds, args.threshold, read_floors=True).items()})
    missing = []
    with contextlib.ExitStack() as stack:
        if not args.no_peers:
            try:
                executors = args.libertem_executors.split(",")
                peers = libertem_cases(frames, op, stack, executors)
                cases.update({("peer", k): f for k, f in peers.items()})
            except ImportError:
                missing.append("libertem (run benchmarks/setup_bench_env.sh)")
            try:
                fai = pyfai_cases(frames, mask, op, geometry, args.pyfai_frames)
                cases.update({("peer", k): f for k, f in fai.items()})
            except ImportError:
                missing.append("pyFAI (run benchmarks/setup_bench_env.sh)")
        for fn in cases.values():  # warm-up: numba, worker start, CSR matrices, page cache
            fn()
        # Rounds interleave every case, so a load change on the machine hits all of them;
        # each case keeps its best round (wall and CPU separately).
        wall = {key: math.inf for key in cases}
        cpu = {key: math.inf for key in cases}
        for _ in range(args.repeat):
            for key, fn in cases.items():
                w, c = _timed(fn)
                wall[key], cpu[key] = min(wall[key], w), min(cpu[key], c)
    for key in wall:
        if key[1].startswith("pyFAI integrate1d"):
            scale = n / min(n, args.pyfai_frames)  # per-frame calls: scale to all frames
            wall[key] *= scale
            cpu[key] *= scale

    def peer(name: str) -> tuple[float, float]:
        keys = [k for k in wall if k[0] == "peer" and k[1].startswith(name)]
        if not keys:
            return math.nan, math.nan
        return min(wall[k] for k in keys), min(cpu[k] for k in keys)

    # The floor of a source is the fastest of its floor passes (the harder target).
    for source in ("memory", "memory uint16", "zarr"):
        keys = [k for k in wall if k[0] == source and k[1].startswith("floor:")]
        wall[(source, "floor")] = min(wall[k] for k in keys)
        cpu[(source, "floor")] = min(cpu[k] for k in keys)

    def pair(a: float, b: float, digits: int = 2) -> str:
        return f"{a:.{digits}f} ({b:.{digits}f})"

    chunk = ds.frames.data.chunks[0][0]
    print(f"# reductions: {n} frames {shape[0]}×{shape[1]} float32, ~{args.photons:g} photons/frame, "
          f"{op.n_bins} radial bins, {chunk} frames per chunk")
    print(f"# Zarr store: {info['codecs']}, compression {info['compression_ratio']:.1f}×, "
          f"{info['batch_frames']} frames per shard")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"dask threads scheduler, best of {args.repeat} interleaved rounds; wall (CPU) seconds")
    print("| what | source | wall (CPU) s | frames/s | vs floor of its source, wall (CPU) | vs peer, wall (CPU) |")
    print("|---|---|---|---|---|---|")
    vs_peer = {
        "center_of_mass": [("LiberTEM CoMUDF", "LiberTEM CoMUDF")],
        "radial_profile": [
            ("LiberTEM ring masks", "LiberTEM ring masks"),
            ("pyFAI integrate1d", "pyFAI integrate1d per frame"),
            ("pyFAI CSR", "pyFAI CSR × whole stack"),
        ],
    }
    for key in wall:
        source, what = key
        if source == "peer" or what == "floor":
            continue
        notes = []
        for prefix, label in vs_peer.get(what, []) if source == "memory" else []:
            pw, pc = peer(prefix)
            if math.isfinite(pw):
                notes.append(f"{pair(pw / wall[key], pc / cpu[key], 1)}× {label}")
        fw, fc = wall[(source, "floor")], cpu[(source, "floor")]
        print(f"| {what} | {source} | {pair(wall[key], cpu[key], 3)} | {n / wall[key]:,.0f} "
              f"| {pair(fw / wall[key], fc / cpu[key])} | {'; '.join(notes)} |")
    fw, fc = wall[("memory", "floor")], cpu[("memory", "floor")]
    for key in wall:
        source, what = key
        if source == "peer":
            note = f" ({args.pyfai_frames} frames timed, scaled)" if what.startswith("pyFAI integrate1d") else ""
            print(f"| {what}{note} | memory | {pair(wall[key], cpu[key], 3)} | {n / wall[key]:,.0f} "
                  f"| {pair(fw / wall[key], fc / cpu[key])} | |")
    for m in missing:
        print(f"| peer missing: {m} | | | | | |")
    zs, zf = ("zarr", "summarize"), ("zarr", "floor")
    print(f"| summarize from Zarr vs Zarr read floor | | | | {pair(wall[zf] / wall[zs], cpu[zf] / cpu[zs])} | |")


@dataclass(frozen=True)
class Bins:
    """The default annuli of `dd.radial_profile` on this stack, for the peers to use too."""

    index: np.ndarray  # (ny, nx) bin of each pixel, −1 masked
    n_bins: int
    center_yx: tuple[float, float]
    bin_width_px: float


def _bins(ds: Any) -> Bins:
    from diffdask.reduce._graph import prepare

    _, _, plan, annuli = prepare(ds, radial=True)
    return Bins(plan.bin_index, plan.n_bins, annuli.center_yx, annuli.bin_width_px)


class _PeakRSS:
    """Sample this process's resident memory every 0.2 s; ``peak`` in bytes."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _poisson_block(block: np.ndarray, mu: np.ndarray, seed: int, block_id: tuple[int, ...] | None = None) -> np.ndarray:
    rng = np.random.default_rng([seed, block_id[0]])
    return rng.poisson(mu, size=block.shape).astype(np.uint16)


def run_scale(args: argparse.Namespace, work: Path) -> None:
    shape = tuple(args.shape)
    geometry = make_geometry(shape)
    mask = make_mask(geometry)
    mu = mean_pattern(geometry, args.photons)
    n = args.n_frames
    chunk = 3000  # ≈ 94 MiB of uint16 frames per task and shard
    template = da.zeros((n, *shape), dtype=np.uint16, chunks=(chunk, *shape))
    frames = template.map_blocks(_poisson_block, mu=mu, seed=0, dtype=np.uint16)
    ds = dd.make_frame_stack(frames, mask=mask, geometry=geometry, chunks=chunk)
    store = work / "scale.zarr"
    with _PeakRSS() as mem_write:
        t0 = time.perf_counter()
        save_frames(ds, store, overwrite=True, batch_frames=chunk)
        t_write = time.perf_counter() - t0
    info = store_info(store)
    with _PeakRSS() as mem_reduce:
        t0 = time.perf_counter()
        stored = open_frames(store)
        save_results(dd.summarize(stored, threshold=args.threshold, min_lit=20), store, "summary", overwrite=True)
        t_reduce = time.perf_counter() - t0
    # The store's read floor (decompress, touch one pixel per frame) on its first 10⁶ frames.
    floor_frames = min(n, 1_000_000)
    head = open_frames(store).frames.data[:floor_frames]
    t0 = time.perf_counter()
    map_frames(_corner, head, {"corner": ((), head.dtype)})["corner"].compute()
    t_floor = time.perf_counter() - t0
    print(f"# scale: {n} frames {shape[0]}×{shape[1]} uint16, ~{args.photons:g} photons/frame; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, dask threads")
    print(f"# store: {info['nbytes'] / 1e9:.1f} GB raw, {info['stored_bytes'] / 1e9:.2f} GB stored "
          f"({info['compression_ratio']:.1f}×)")
    print("| step | wall s | frames/s | peak RSS GiB |")
    print("|---|---|---|---|")
    print(f"| simulate + save_frames | {t_write:.1f} | {n / t_write:,.0f} | {mem_write.peak / 2**30:.2f} |")
    print(
        f"| open_frames + summarize + save_results | {t_reduce:.1f} | {n / t_reduce:,.0f} "
        f"| {mem_reduce.peak / 2**30:.2f} |"
    )
    print(f"| read floor (first {floor_frames:,} frames) | {t_floor:.1f} | {floor_frames / t_floor:,.0f} | |")
    print(f"# summarize at {(n / t_reduce) / (floor_frames / t_floor):.2f}× the store's read floor (frames/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=None, help="default 20000 (10⁷ with --scale)")
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--photons", type=float, default=3000.0, help="mean photons per frame in the sphere pattern")
    parser.add_argument("--threshold", type=float, default=0.5, help="lit-pixel threshold, photons")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pyfai-frames", type=int, default=1000, help="frames timed for pyFAI (per-frame calls)")
    parser.add_argument("--no-peers", action="store_true", help="skip LiberTEM and pyFAI")
    parser.add_argument(
        "--libertem-executors",
        default="threads",
        help="comma-separated LiberTEM executors to time (its best counts); 'dask' starts worker "
        "processes that each hold the data, measured 10-100× slower than 'threads' on 2 cores",
    )
    parser.add_argument("--scale", action="store_true", help="the 10⁷-frame write + summarize run")
    parser.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()
    if args.n_frames is None:
        args.n_frames = 10_000_000 if args.scale else 20_000
    work = Path(tempfile.mkdtemp(prefix="diffdask-bench-", dir=args.workdir))
    try:
        with dask.config.set(scheduler="threads"):
            (run_scale if args.scale else run_comparison)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

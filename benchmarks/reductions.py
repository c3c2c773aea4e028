"""Per-frame reductions against the read floors and against peers, measured in one run.

On one synthetic stack (Poisson photons of a sphere pattern plus background, float32, with a
beamstop and a panel gap in the mask, beam off-centre) this measures:

(a) floors: one in-memory pass (``frames.sum()`` on the same Dask chunks and threads) and
    one pass reading the compressed Zarr store (`open_frames`, decompress + sum);
(b) diffdask `center_of_mass`, `radial_profile`, `lit_pixels` and `summarize`, in memory and
    from the Zarr store;
(c) peers on the same frames, from the benchmark environment only
    (``benchmarks/setup_bench_env.sh``): LiberTEM ``CoMUDF`` and ``ApplyMasksUDF`` with one
    ring mask per radial bin (LiberTEM's best executor of 'threads' and 'dask' with all
    cores), and pyFAI ``integrate1d`` per frame with the CSR engine (no pixel splitting,
    same bins, same mask; timed on a subset and given as a rate).

Throughputs are printed as frames/s and as ratios (against the floors and the peers).
Peers that are not installed are reported as missing, not skipped silently.

``--scale`` runs the end-to-end scale test instead: 10⁶ frames (``--n-frames``) of 128×128
uint16 Poisson photons written to a Zarr store with `save_frames` in bounded memory, then
``save_results(summarize(open_frames(store)))``, reporting wall times and peak memory (RSS).

Run: ``python benchmarks/reductions.py`` (``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np

import diffdask as dd
from diffdask.io import open_frames, save_frames, save_results, store_info

GEOMETRY = dict(pixel_size_m=75e-6, distance_m=0.13, wavelength_m=0.729e-9)


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


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


def bench_diffdask(ds: Any, threshold: float, repeat: int) -> dict[str, float]:
    """Seconds for each diffdask reduction of a frame stack (computed with the current scheduler)."""
    frames = ds.frames.data
    return {
        "floor": _best(lambda: frames.sum().compute(), repeat),
        "center_of_mass": _best(lambda: dd.center_of_mass(ds).compute(), repeat),
        "radial_profile": _best(lambda: dd.radial_profile(ds).compute(), repeat),
        "lit_pixels": _best(lambda: dd.lit_pixels(ds, threshold).compute(), repeat),
        "summarize": _best(lambda: dd.summarize(ds, threshold=threshold, min_lit=20).compute(), repeat),
    }


def bench_libertem(frames: np.ndarray, mask: np.ndarray, op: Any, repeat: int) -> dict[str, Any]:
    """LiberTEM CoMUDF and ring masks (one per bin), best executor; seconds."""
    try:
        import libertem.api as lt
        from libertem.udf.com import CoMUDF
        from libertem.udf.masks import ApplyMasksUDF
    except ImportError:
        return {"missing": "libertem (run benchmarks/setup_bench_env.sh)"}
    n = frames.shape[0]
    nav = (n // 100, 100) if n % 100 == 0 else (n,)
    data = frames.reshape(*nav, *frames.shape[1:])
    bins = op.bin_map()
    factories = [(lambda k=k: (bins == k).astype(np.float32)) for k in range(op.n_bins)]
    cy, cx = op.center_yx
    # LiberTEM's CoMUDF warns about np.divide(where=...) on every partition.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"libertem\..*")
    warnings.filterwarnings("ignore", message="Sending large graph", category=UserWarning)
    best: dict[str, Any] = {}
    for executor in ("threads", "dask"):
        ctx = lt.Context.make_with(executor, cpus=os.cpu_count())
        try:
            lds = ctx.load("memory", data=data, sig_dims=2)
            ctx.run_udf(dataset=lds, udf=CoMUDF.with_params(cy=cy, cx=cx))  # warm-up (numba, workers)
            t_com = _best(lambda: ctx.run_udf(dataset=lds, udf=CoMUDF.with_params(cy=cy, cx=cx)), repeat)
            udf = ApplyMasksUDF(mask_factories=factories)
            ctx.run_udf(dataset=lds, udf=udf)
            t_rings = _best(lambda: ctx.run_udf(dataset=lds, udf=ApplyMasksUDF(mask_factories=factories)), repeat)
        finally:
            ctx.close()
        for key, t in (("CoMUDF", t_com), ("ring masks", t_rings)):
            if key not in best or t < best[key][0]:
                best[key] = (t, executor)
    return best


def bench_pyfai(frames: np.ndarray, mask: np.ndarray, op: Any, geometry: dd.Geometry, n_frames: int) -> dict[str, Any]:
    """pyFAI integrate1d per frame, CSR engine, same bins and mask; seconds per frame."""
    try:
        from pyFAI.integrator.azimuthal import AzimuthalIntegrator
    except ImportError:
        return {"missing": "pyFAI (run benchmarks/setup_bench_env.sh)"}
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
    r_max_mm = op.n_bins * op.bin_width_px * p * 1e3
    kwargs = dict(
        unit="r_mm",
        method=("no", "csr", "cython"),
        mask=~mask,
        radial_range=(0.0, r_max_mm),
        correctSolidAngle=False,
    )
    ai.integrate1d(frames[0], op.n_bins, **kwargs)  # builds the CSR matrix (not timed)
    sub = frames[:n_frames]
    t0 = time.perf_counter()
    for frame in sub:
        ai.integrate1d(frame, op.n_bins, **kwargs)
    return {"integrate1d": ((time.perf_counter() - t0) / len(sub), "csr")}


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
    op = _operator(ds)

    mem = bench_diffdask(ds, args.threshold, args.repeat)
    zarr = bench_diffdask(zds, args.threshold, args.repeat)
    peers = {} if args.no_peers else bench_libertem(frames, mask, op, args.repeat)
    fai = {} if args.no_peers else bench_pyfai(frames, mask, op, geometry, args.pyfai_frames)

    n = args.n_frames
    chunk = ds.frames.data.chunks[0][0]
    print(f"# reductions: {n} frames {shape[0]}×{shape[1]} float32, ~{args.photons:g} photons/frame, "
          f"{op.n_bins} radial bins, {chunk} frames per chunk")
    print(f"# Zarr store: {info['codecs']}, compression {info['compression_ratio']:.1f}×, "
          f"{info['batch_frames']} frames per shard")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"dask threads scheduler, best of {args.repeat}")
    print("| what | source | s | frames/s | vs floor of its source | vs peer |")
    print("|---|---|---|---|---|---|")
    peer_for = {
        "center_of_mass": ("CoMUDF", "LiberTEM CoMUDF"),
        "radial_profile": ("ring masks", "LiberTEM ring masks"),
    }
    for source, res in (("memory", mem), ("zarr", zarr)):
        for what, t in res.items():
            vs_peer = ""
            if source == "memory" and what in peer_for and peer_for[what][0] in peers:
                tp = peers[peer_for[what][0]][0]
                vs_peer = f"{tp / t:.1f}× {peer_for[what][1]}"
            if source == "memory" and what == "radial_profile" and "integrate1d" in fai:
                tp = fai["integrate1d"][0] * n
                vs_peer += f"{'; ' if vs_peer else ''}{tp / t:.0f}× pyFAI integrate1d"
            print(f"| {what} | {source} | {t:.3f} | {n / t:,.0f} | {res['floor'] / t:.2f} | {vs_peer} |")
    for name, value in list(peers.items()) + list(fai.items()):
        if name == "missing":
            print(f"| peer missing: {value} | | | | | |")
            continue
        t, how = value
        total = t * n if name == "integrate1d" else t
        label = f"pyFAI integrate1d ({how}, {args.pyfai_frames} frames timed)" if name == "integrate1d" else f"LiberTEM {name} ({how})"
        print(f"| {label} | memory | {total:.3f} | {n / total:,.0f} | {mem['floor'] / total:.2f} | |")
    print(f"| summarize from Zarr vs Zarr read floor | | | | {zarr['floor'] / zarr['summarize']:.2f} | |")


def _operator(ds: Any) -> Any:
    from diffdask.reduce._graph import prepare

    return prepare(ds, radial=True)[2]


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
    print(f"# scale: {n} frames {shape[0]}×{shape[1]} uint16, ~{args.photons:g} photons/frame; "
          f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, dask threads")
    print(f"# store: {info['nbytes'] / 1e9:.1f} GB raw, {info['stored_bytes'] / 1e9:.2f} GB stored "
          f"({info['compression_ratio']:.1f}×)")
    print("| step | wall s | frames/s | peak RSS GiB |")
    print("|---|---|---|---|")
    print(f"| simulate + save_frames | {t_write:.1f} | {n / t_write:,.0f} | {mem_write.peak / 2**30:.2f} |")
    print(f"| open_frames + summarize + save_results | {t_reduce:.1f} | {n / t_reduce:,.0f} | {mem_reduce.peak / 2**30:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=None, help="default 20000 (10⁶ with --scale)")
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--photons", type=float, default=3000.0, help="mean photons per frame in the sphere pattern")
    parser.add_argument("--threshold", type=float, default=0.5, help="lit-pixel threshold, photons")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--pyfai-frames", type=int, default=1000, help="frames timed for pyFAI (per-frame calls)")
    parser.add_argument("--no-peers", action="store_true", help="skip LiberTEM and pyFAI")
    parser.add_argument("--scale", action="store_true", help="the 10⁶-frame write + summarize run")
    parser.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()
    if args.n_frames is None:
        args.n_frames = 1_000_000 if args.scale else 20_000
    work = Path(tempfile.mkdtemp(prefix="diffdask-bench-", dir=args.workdir))
    try:
        with dask.config.set(scheduler="threads"):
            (run_scale if args.scale else run_comparison)(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

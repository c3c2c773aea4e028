"""Zarr write/read throughput and compression of photon stacks, against the in-memory floor.

For a Poisson(λ) photon stack (uint16 counts and the same counts as float32) this measures,
in one run on the same frames:

- floor: one plain NumPy pass over the in-memory array (``frames.sum()``);
- diffdask: `save_frames` (sharded, Blosc zstd + bitshuffle) and a full read of
  `open_frames` (decompress + sum), MB/s of uncompressed frame bytes, and compression ratio;
- peer: xarray ``to_zarr`` / ``open_zarr`` with zarr-python's default codecs, same chunks.

Ratios are printed against the floor and the peer. Run: ``python benchmarks/io_throughput.py``.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import dask
import numpy as np
import xarray as xr

import diffdask as dd
from diffdask.io import open_frames, save_frames, store_info


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(n_frames: int, shape: tuple[int, int], rate: float, repeat: int, workdir: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    counts = rng.poisson(rate, size=(n_frames, *shape)).astype("uint16")
    rows = []
    for dtype in ("uint16", "float32"):
        frames = counts.astype(dtype)
        mb = frames.nbytes / 1e6
        floor = _best(lambda: frames.sum(dtype="float64"), repeat)
        ds = dd.make_frame_stack(frames)
        batch = ds.frames.data.chunks[0][0]
        store = workdir / f"diffdask-{dtype}.zarr"

        def write() -> None:
            save_frames(ds, store, overwrite=True)

        t_write = _best(write, repeat)
        t_read = _best(lambda: open_frames(store).frames.data.sum(dtype="float64").compute(), repeat)
        ratio = store_info(store)["compression_ratio"]

        peer = workdir / f"xarray-{dtype}.zarr"
        xds = xr.Dataset({"frames": (("frame", "y", "x"), ds.frames.data)})

        def peer_write() -> None:
            xds.to_zarr(peer, mode="w", zarr_format=3, consolidated=True)

        t_peer_write = _best(peer_write, repeat)
        t_peer_read = _best(
            lambda: xr.open_zarr(peer, chunks={"frame": batch}).frames.data.sum(dtype="float64").compute(), repeat
        )
        peer_ratio = frames.nbytes / _dir_bytes(peer / "frames")
        rows.append(
            dict(
                dtype=dtype,
                mb=mb,
                floor=mb / floor,
                write=mb / t_write,
                read=mb / t_read,
                ratio=ratio,
                peer_write=mb / t_peer_write,
                peer_read=mb / t_peer_read,
                peer_ratio=peer_ratio,
            )
        )
        shutil.rmtree(store)
        shutil.rmtree(peer)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=20000)
    parser.add_argument("--shape", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--rate", type=float, default=0.05, help="mean photons per pixel")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="diffdask-bench-", dir=args.workdir))
    try:
        with dask.config.set(scheduler="threads"):
            rows = run(args.n_frames, tuple(args.shape), args.rate, args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# io_throughput: {args.n_frames} frames {args.shape[0]}×{args.shape[1]}, Poisson({args.rate})")
    print(f"# {platform.machine()}, {platform.python_version()}, dask threads, best of {args.repeat}")
    print(
        "| dtype | MB | floor MB/s | write MB/s | read MB/s | write/floor | read/floor "
        "| compression | xarray write MB/s | xarray read MB/s | write vs xarray | read vs xarray | xarray compression |"
    )
    print("|---" * 13 + "|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['mb']:.0f} | {r['floor']:.0f} | {r['write']:.0f} | {r['read']:.0f} "
            f"| {r['write'] / r['floor']:.3f} | {r['read'] / r['floor']:.3f} | {r['ratio']:.1f}× "
            f"| {r['peer_write']:.0f} | {r['peer_read']:.0f} | {r['write'] / r['peer_write']:.2f}× "
            f"| {r['read'] / r['peer_read']:.2f}× | {r['peer_ratio']:.1f}× |"
        )


if __name__ == "__main__":
    main()

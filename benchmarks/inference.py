"""Inference throughput: `predict` on a LocalCluster against a direct torch loop, same frames.

The paper's pre-activation ResNet (`HitClassifier`, 192×96 patches, random weights: speed does
not depend on them) over Poisson frames, single model and a 5-model ensemble with mirroring
(20 forward passes per frame: 5 models × 4 mirror views). The direct loop preprocesses and runs batches in this process
with torch using all cores; `predict` maps the same kernel over chunks on 2 worker processes of
one thread each (torch one thread per Dask thread). Overhead = 1 − predict rate / loop rate.

Run: ``python benchmarks/inference.py [--n-frames 1024]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import dask.array as da
import distributed
import numpy as np
import torch

import diffdask as dd
from diffdask.ml import (
    HitClassifier,
    ModelSpec,
    Preprocess,
    mirror_views,
    predict,
    save_model,
)


def direct_loop(frames: np.ndarray, models: list, mirror: bool, batch_size: int) -> np.ndarray:
    prep = Preprocess(crop=(192, 96))
    center = ((frames.shape[1] - 1) / 2, (frames.shape[2] - 1) / 2)
    outs = []
    with torch.inference_mode():
        for start in range(0, len(frames), batch_size):
            x = torch.from_numpy(prep.apply(frames[start : start + batch_size], np.ones(frames.shape[1:], bool), center))
            total = 0
            for m in models:
                views = mirror_views(x) if mirror else [x]
                total = total + sum(torch.softmax(m(v), 1) for v in views) / len(views)
            outs.append((total / len(models)).numpy())
    return np.concatenate(outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-frames", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    chunk = max(1, args.n_frames // 16)
    # Frames drawn per chunk (seeded), so persisting them spreads the chunks over the workers.
    lazy = da.random.RandomState(0).poisson(0.3, size=(args.n_frames, 192, 96), chunks=(chunk, -1, -1))
    ds = dd.make_frame_stack(lazy.astype(np.uint16), chunks=chunk)
    folder = Path(tempfile.mkdtemp(prefix="diffdask-inference-"))
    models, paths = [], []
    for k in range(5):
        torch.manual_seed(k)
        m = HitClassifier().eval()
        paths.append(str(save_model(m, folder / f"m{k}", ModelSpec("HitClassifier", {}, Preprocess(crop=(192, 96)).to_dict(),
                                                                    ["single", "other"], input_shape=[192, 96]))))
        models.append(m)
    print(f"# inference: {args.n_frames} frames 192×96, HitClassifier ({sum(p.numel() for p in models[0].parameters())} "
          f"parameters), {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| case | direct loop frames/s | predict (LocalCluster 2×1) frames/s | predict / loop |")
    print("|---|---|---|---|")
    with dd.connect(n_workers=2, threads_per_worker=1):
        # Frames in worker memory: the timing is inference, not making or shipping data.
        ds = ds.persist()
        distributed.wait(ds.frames.data)
        frames = ds.frames.values
        # The ensemble makes 20 forward passes per frame (5 models × 4 mirror views): it runs on an
        # eighth of the frames.
        for name, members, mirror, n in (("single model", 1, False, args.n_frames),
                                         ("5-model ensemble + mirroring", 5, True, args.n_frames // 8)):
            torch.set_num_threads(os.cpu_count() or 1)
            t0 = time.perf_counter()
            ref = direct_loop(frames[:n], models[:members], mirror, args.batch_size)
            loop_rate = n / (time.perf_counter() - t0)
            out = predict(ds.isel(frame=slice(0, n)), paths[:members], batch_size=args.batch_size, mirror=mirror,
                          device="cpu")
            out.probabilities.data[:1].compute()  # plugin set-up and model loading are not throughput
            t0 = time.perf_counter()
            probs = out.probabilities.values
            rate = n / (time.perf_counter() - t0)
            assert np.allclose(probs, ref, atol=1e-4)
            print(f"| {name} ({n} frames) | {loop_rate:.1f} | {rate:.1f} | {rate / loop_rate:.2f} |")


if __name__ == "__main__":
    main()

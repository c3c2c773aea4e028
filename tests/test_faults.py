"""Fault suite: a writer SIGKILLed at a random batch (seeded), then re-run, gives the same bytes.

The writer runs in its own process on the threaded scheduler, so SIGKILL stops every write at
once — the way a node dies — wherever it happens to be: between batches, in the middle of a
shard, or while a ``done`` entry is being set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import diffdask as dd
from diffdask.io import verify_store

N_FRAMES, BATCH = 400, 10

WRITER = """
import sys, dask, diffdask as dd
ds = dd.simulate_spi({n}, dd.Geometry((32, 32), 600e-6, 0.3, 6e-10), chunks={b}, seed=3)
with dask.config.set(scheduler="threads", num_workers=2):
    dd.save_frames(ds, sys.argv[1], batch_frames={b})
""".format(n=N_FRAMES, b=BATCH)


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "run.zarr"
    subprocess.run([sys.executable, "-c", WRITER, str(path)], check=True, capture_output=True)
    return path


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_batch_then_rerun_is_bit_identical(tmp_path, reference, seed):
    n_batches = N_FRAMES // BATCH
    kill_after = int(np.random.default_rng(seed).integers(1, n_batches // 2))
    store = tmp_path / "run.zarr"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(store)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    shards = store / "frames" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(os.listdir(shards)) >= kill_after:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    # What the dead job left is never mistaken for a complete store...
    with pytest.raises(dd.IncompleteStoreError):
        dd.open_frames(store)
    assert _tree(store) != _tree(reference)
    # ...and the same command again finishes it to the bytes of an uninterrupted run.
    subprocess.run([sys.executable, "-c", WRITER, str(store)], check=True, capture_output=True)
    assert _tree(store) == _tree(reference)
    assert {entry["status"] for entry in verify_store(store)} == {"ok"}

"""Local clusters: CPU LocalCluster, or LocalCUDACluster with one worker per GPU."""

from __future__ import annotations

from typing import Any

from distributed import Client

import diffdask as dd
from diffdask.backend import gpu_available


def local_cluster(gpu: str | bool = "auto", **kwargs: Any) -> Client:
    """A client on this machine: one worker per GPU when asked (or "auto" and GPUs exist)."""
    use_gpu = gpu_available() if gpu == "auto" else bool(gpu)
    if not use_gpu:
        return dd.connect(**kwargs)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise dd.BackendError("a GPU cluster needs dask-cuda: pip install 'diffdask[gpu]'") from exc
    # One process per GPU; the dashboard stays on localhost.
    cluster = LocalCUDACluster(ip="127.0.0.1", dashboard_address="127.0.0.1:0", **kwargs)
    return Client(cluster)

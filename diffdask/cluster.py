"""Connecting to a Dask cluster: an address, a scheduler file, or an embedded LocalCluster.

Library functions never create a client; scripts, notebooks and the CLI call `connect` once.
Deployment recipes (SLURM, Kubernetes, Gateway, CUDA nodes) live in ``cluster/`` and hand
their scheduler address or file to `connect`, or set ``DIFFDASK_SCHEDULER``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client

from diffdask.errors import ClusterError

#: Environment variable naming the scheduler to use: an address (``tcp://host:8786``) or the
#: path of a scheduler file (``*.json``, as written by ``dask scheduler --scheduler-file``).
SCHEDULER_ENV = "DIFFDASK_SCHEDULER"


#: Allocator settings distributed gives its workers that diffdask's LocalCluster leaves out.
MALLOC_ENVIRON = ("MALLOC_TRIM_THRESHOLD_",)


@contextmanager
def worker_environment() -> Iterator[None]:
    """Spawn LocalCluster worker processes inside this to give them glibc's default allocator.

    distributed starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which turns off glibc's
    adaptive mmap threshold: every temporary above 128 KiB is then mapped and unmapped, and a
    kernel made of many detector-sized temporaries (the per-frame geometry fit) ran 4× slower
    in a worker than in the client process (0.41 vs 0.10 s per frame). Its nannies also write
    the variable into this process's environment, which every later worker inherits, so a
    value equal to distributed's own is removed here too. The thread caps
    (``OMP_NUM_THREADS=1``...) stay.
    """
    configured = dask.config.get("distributed.nanny.pre-spawn-environ", {})
    for key in MALLOC_ENVIRON:
        if key in configured and os.environ.get(key) == str(configured[key]):
            del os.environ[key]
    with dask.config.set({"distributed.nanny.pre-spawn-environ":
                          {k: v for k, v in configured.items() if k not in MALLOC_ENVIRON}}):
        yield


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


#: Bytes a Dask scheduler's TCP handshake starts with: its frame count and lengths, then msgpack.
_HANDSHAKE_MARK = b"compression"


def _check_is_scheduler(address: str, timeout: float) -> None:
    """Refuse a TCP endpoint that accepts connections but does not speak Dask.

    distributed's connect timeout covers the TCP connect only: something else listening there
    (an HTTP server, the dashboard port) leaves the client waiting for a handshake forever. A
    scheduler sends its handshake as soon as it accepts, so one read with a timeout tells.
    """
    import socket

    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp") or ":" not in rest:
        return  # TLS, UCX and in-process addresses: left to distributed
    host, _, port = rest.rpartition(":")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except ValueError:
        raise ClusterError(f"{address!r} is not a scheduler address; use tcp://HOST:PORT.") from None
    except OSError:
        return  # unreachable: distributed reports it below, with its own reason
    with sock:
        sock.settimeout(timeout)
        try:
            first = sock.recv(256)
        except OSError:  # including the read timeout
            first = b""
    if _HANDSHAKE_MARK not in first:
        raise ClusterError(
            f"{address!r} accepts connections but is not a Dask scheduler (no Dask handshake within "
            f"{timeout} s). Check the port: the scheduler usually listens on 8786, its dashboard on 8787."
        )


def _check_scheduler_file(path: str) -> None:
    """A scheduler file must be the JSON that `dask scheduler --scheduler-file` writes."""
    import json

    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exc:
        raise ClusterError(f"scheduler file {path!r} cannot be read as JSON ({exc}); it may be half-written or "
                           "from another program: restart the scheduler with --scheduler-file.") from exc
    if not isinstance(info, dict) or not isinstance(info.get("address"), str):
        raise ClusterError(
            f"scheduler file {path!r} has no scheduler address (a string under 'address'); "
            "restart the scheduler with --scheduler-file, or pass the address instead."
        )


def connect(
    address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | float = "auto",
    processes: bool = True,
    timeout: float = 30.0,
    **cluster_kwargs: Any,
) -> Client:
    """A ``distributed.Client`` for diffdask work.

    Resolution order: ``address``; ``scheduler_file``; the ``DIFFDASK_SCHEDULER`` environment
    variable (address or scheduler-file path); else a new LocalCluster on this machine, bound to
    127.0.0.1 (scheduler and dashboard are not reachable from the network), with
    workers × threads = usable cores. Closing the client closes that LocalCluster.

    Parameters
    ----------
    address : str, optional
        Scheduler address, e.g. ``"tcp://10.0.0.5:8786"``.
    scheduler_file : str, optional
        Path of a scheduler JSON file (SLURM/PBS batch mode).
    n_workers, threads_per_worker : int, optional
        LocalCluster size; default: one single-threaded worker process per usable core on up
        to 4 cores, else processes of 2 threads (NumPy/BLAS kernels release the GIL).
    memory_limit : str or float
        Memory limit per LocalCluster worker ("auto" divides the machine's memory).
    processes : bool
        LocalCluster workers as processes (True) or threads of this process.
    timeout : float
        Seconds to wait for a remote scheduler.
    **cluster_kwargs
        Further LocalCluster arguments.

    Returns
    -------
    distributed.Client

    Raises
    ------
    ClusterError
        The scheduler cannot be reached, the scheduler file is missing, or the sizes are invalid.
    """
    if address is None and scheduler_file is None:
        env = os.environ.get(SCHEDULER_ENV, "").strip()
        if env:
            if env.endswith(".json") or os.path.isfile(env):
                scheduler_file = env
            else:
                address = env
    if scheduler_file is not None:
        if not os.path.isfile(scheduler_file):
            raise ClusterError(
                f"scheduler file {scheduler_file!r} does not exist; start the scheduler with "
                "`dask scheduler --scheduler-file PATH` first, or unset DIFFDASK_SCHEDULER."
            )
        _check_scheduler_file(scheduler_file)
        try:
            return Client(scheduler_file=scheduler_file, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"could not reach the scheduler in {scheduler_file!r}: {exc}") from exc
    if address is not None:
        _check_is_scheduler(address, timeout)
        try:
            return Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"could not reach the Dask scheduler at {address!r} within {timeout} s: {exc}. Check the "
                "address, that the scheduler runs, and any SSH tunnel to it."
            ) from exc
    cores = _usable_cores()
    if threads_per_worker is None:
        threads_per_worker = 1 if cores <= 4 else 2
    if n_workers is None:
        n_workers = max(1, cores // threads_per_worker)
    if int(n_workers) < 1 or int(threads_per_worker) < 1:
        raise ClusterError(f"n_workers and threads_per_worker must be ≥ 1, got {n_workers}, {threads_per_worker}.")
    cluster_kwargs.setdefault("dashboard_address", "127.0.0.1:0")
    if processes:
        # Thread-only clusters talk in-process; process clusters must not listen beyond this machine.
        cluster_kwargs.setdefault("host", "127.0.0.1")
    with worker_environment():
        return Client(
            n_workers=int(n_workers),
            threads_per_worker=int(threads_per_worker),
            memory_limit=memory_limit,
            processes=processes,
            **cluster_kwargs,
        )

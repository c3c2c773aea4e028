"""A dask-jobqueue SLURMCluster for diffdask: one GPU per worker job, lifetimes, adaptive scaling."""

from __future__ import annotations

from typing import Any


def slurm_cluster(
    account: str,
    queue: str = "gpu",
    cores: int = 8,
    memory: str = "64GB",
    gpus_per_job: int = 1,
    walltime: str = "04:00:00",
    lifetime: str = "3h50m",
    lifetime_stagger: str = "5m",
    min_jobs: int = 1,
    max_jobs: int = 16,
    start: bool = True,
    scheduler_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """A SLURMCluster whose jobs each hold one worker with ``gpus_per_job`` GPUs.

    Workers retire gracefully before the walltime (``--lifetime``, staggered) and ``adapt``
    replaces them, so long pipelines survive job limits. ``start=False`` returns the cluster
    object only to render its job script (``cluster.job_script()``).
    """
    from dask_jobqueue import SLURMCluster

    cluster = SLURMCluster(
        account=account,
        queue=queue,
        cores=cores,
        processes=1,
        memory=memory,
        walltime=walltime,
        job_extra_directives=[f"--gres=gpu:{gpus_per_job}", f"--gpus-per-task={gpus_per_job}"],
        job_script_prologue=["export OMP_NUM_THREADS=1", "module load cuda || true"],
        worker_extra_args=["--lifetime", lifetime, "--lifetime-stagger", lifetime_stagger, "--resources", f"GPU={gpus_per_job}"],
        # The dashboard stays on the scheduler node's loopback: reach it through an SSH tunnel.
        scheduler_options={"dashboard_address": "127.0.0.1:8787", **(scheduler_options or {})},
        **kwargs,
    )
    if start:
        cluster.adapt(minimum_jobs=min_jobs, maximum_jobs=max_jobs)
    return cluster

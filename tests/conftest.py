"""Shared fixtures: a real 2-process LocalCluster, small frame stacks on disk."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

import diffdask as dd
from diffdask.cluster import worker_environment


def pytest_collection_modifyitems(config, items):
    """Skip the ``gpu`` tests where CuPy sees no CUDA device (they run as they are on a GPU node)."""
    from diffdask.backend import gpu_available

    if gpu_available():
        return
    skip = pytest.mark.skip(reason="no usable CUDA device (CuPy missing or no GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cluster():
    """One 2-process LocalCluster for the whole session (starting one takes seconds)."""
    with worker_environment(), LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
    ) as c:
        yield c


@pytest.fixture
def client(cluster):
    """A distributed Client on the session cluster, the default scheduler for the test."""
    with Client(cluster) as c:
        yield c


@pytest.fixture
def geometry() -> dd.Geometry:
    return dd.Geometry((24, 30), pixel_size_m=200e-6, distance_m=0.15, wavelength_m=2e-10, beam_center_yx=(11.3, 15.8))


@pytest.fixture
def photon_stack(geometry):
    """A sparse Poisson photon stack with a mask, geometry and per-frame variables."""
    rng = np.random.default_rng(1234)
    frames = rng.poisson(0.05, size=(70, *geometry.shape)).astype("uint16")
    mask = np.ones(geometry.shape, dtype=bool)
    mask[10:12, :] = False
    mask[0, 0] = False
    return dd.make_frame_stack(
        frames,
        mask=mask,
        geometry=geometry,
        per_frame={"label": rng.integers(0, 3, 70), "orientation": rng.normal(size=(70, 4))},
        attrs={"units": "photons"},
        chunks=9,
    )

"""Backend dispatch: one lookup tells NumPy, CuPy and torch apart; kernels see one API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffdask.backend import array_namespace, library_of, to_cpu, to_torch


def test_library_of_each_kind_of_array():
    assert library_of(np.zeros(3)) == "numpy"
    assert library_of(np.float32(1)) == "numpy"
    assert library_of([1, 2]) == "numpy"
    assert library_of(torch.zeros(3)) == "torch"


def test_torch_namespace_means_what_numpy_means():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7))
    t = torch.from_numpy(a)
    xp = array_namespace(t)
    got = xp.sum(xp.where(t > 0, t, xp.zeros_like(t)), axis=0)
    assert library_of(got) == "torch"
    np.testing.assert_allclose(to_cpu(got), np.where(a > 0, a, 0).sum(axis=0), rtol=0, atol=1e-12)
    assert array_namespace(a) is np


def test_round_trips_through_torch_keep_values():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = to_torch(a)
    assert isinstance(t, torch.Tensor) and to_torch(t) is not None
    np.testing.assert_array_equal(to_cpu(to_torch(t)), a)


@pytest.mark.gpu
def test_cupy_namespace_and_round_trip():
    cupy = pytest.importorskip("cupy")
    a = np.arange(6.0)
    g = cupy.asarray(a)
    assert library_of(g) == "cupy" and array_namespace(g) is cupy
    np.testing.assert_array_equal(to_cpu(to_torch(g)), a)

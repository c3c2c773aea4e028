"""Bootstrapped EMC: several runs on random subsets of the frames, advanced in one pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from diffdask.emc.emc2d import EMC2D, EMCIteration, EMCResult, _EMCJob
from diffdask.errors import ParameterError
from diffdask.frames import make_frame_stack


def bootstrap_membership(n_frames: int, n_runs: int, fraction: float, seed: int) -> np.ndarray:
    """Which frames each run uses: ``round(fraction · n_frames)`` frames per run, drawn without
    replacement from ``default_rng([seed, run])``.

    Returns
    -------
    ndarray of bool, shape (n_frames, n_runs)
    """
    if int(n_runs) < 1:
        raise ParameterError(f"n_runs must be ≥ 1, got {n_runs}.")
    if not 0 < float(fraction) <= 1:
        raise ParameterError(f"fraction must be in (0, 1], got {fraction}.")
    n_pick = max(1, int(round(float(fraction) * n_frames)))
    member = np.zeros((n_frames, int(n_runs)), dtype=bool)
    for b in range(int(n_runs)):
        member[np.random.default_rng([seed, b]).choice(n_frames, size=n_pick, replace=False), b] = True
    return member


@dataclass
class BootstrapResult:
    """Runs of a bootstrap: the EMC history of all runs and each run's frame subset."""

    result: EMCResult
    member: np.ndarray

    @property
    def final(self) -> EMCIteration:
        return self.result.final

    def averages(self) -> xr.Dataset:
        """The n_runs × n_classes class averages as a frame stack (input of common lines).

        Per-frame variables: ``run``, ``class_index`` and ``n_members`` (frames of the run whose
        most probable class it is).
        """
        it = self.final
        n_runs, n_classes, s, _ = it.models.shape
        best = np.argmax(it.occupancy, axis=2)  # (D, B)
        counts = np.array(
            [np.bincount(best[self.member[:, b] & np.isfinite(it.scale[:, b]), b], minlength=n_classes)
             for b in range(n_runs)]
        )
        return make_frame_stack(
            it.models.reshape(n_runs * n_classes, s, s),
            per_frame={
                "run": np.repeat(np.arange(n_runs), n_classes),
                "class_index": np.tile(np.arange(n_classes), n_runs),
                "n_members": counts.ravel(),
            },
            attrs={"source": "diffdask.emc.bootstrap", "iteration": it.iteration},
        )


def bootstrap(
    ds: xr.Dataset,
    n_runs: int = 5,
    fraction: float = 0.8,
    n_classes: int = 200,
    n_rotations: int = 36,
    iterations: int = 20,
    seed: int = 0,
    callback: Callable[[EMCIteration], None] | None = None,
    **emc_options: Any,
) -> BootstrapResult:
    """Bootstrapped 2D EMC (Zhuang et al. 2022, §2.2.1): ``n_runs`` runs, each on a random
    ``fraction`` of the frames with its own random start models, all advanced together — one
    pass over the frames per iteration, with per-run membership weights on the frames.

    Parameters
    ----------
    ds : xarray.Dataset
        Frame stack (see `EMC2D.run`).
    n_runs, fraction : int, float
        Number of runs and the fraction of frames each uses.
    n_classes, n_rotations : int
        K and J of every run.
    iterations : int
        EMC iterations.
    seed : int
        Seed of the subsets and of the start models (run b uses ``[seed, b]``).
    callback : callable, optional
        Called with each iteration's results.
    **emc_options
        Further `EMC2D` options (``friedel``, ``need_scaling``, ``beta``, ``beta_schedule``).

    Returns
    -------
    BootstrapResult
    """
    emc = EMC2D(n_classes, n_rotations, **emc_options)
    member = bootstrap_membership(ds.sizes["frame"], n_runs, fraction, seed)
    job = _EMCJob(emc, ds, n_runs=int(n_runs), member=member)
    result = job.iterate(iterations, None, seed, None, 1, None, callback)
    return BootstrapResult(result, job.member)

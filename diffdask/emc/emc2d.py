"""Distributed 2D EMC with in-plane rotations and bootstrapped runs.

Dragonfly splits orientations across MPI ranks and replicates the data; diffdask splits the
frames. Each iteration is one pass over the photon chunks persisted on the workers (E-step,
per-frame scales, partial M-step sums for every run) plus a tree reduction of the partial sums
and one compress task; only models (B × K × S²), the summed tomogram-sized numerators and
per-frame results move. This is an iterative algorithm: it computes each iteration's small
state itself and keeps the frames persisted for the whole run.
"""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
import scipy.sparse as sp
import xarray as xr

from diffdask.blocks import tree_combine
from diffdask.emc.detector import EMCDetector
from diffdask.emc.kernels import (
    EMCOperators,
    bilinear_operators,
    compress,
    emc_chunk,
    photon_stats,
)
from diffdask.errors import ParameterError, SchemaError
from diffdask.frames import validate

_SUMS = ("numerator", "denominator")
_PER_FRAME = ("scale", "orientation", "occupancy", "likelihood", "mutual_info", "probabilities")


def _to_counts(block: np.ndarray, pixels: np.ndarray) -> sp.csr_matrix:
    """Photon counts of a block of frames on the EMC pixels, as float64 CSR.

    NaN/inf and negative values carry no photons and are dropped.
    """
    flat = np.asarray(block).reshape(block.shape[0], -1)[:, pixels]
    if flat.dtype.kind == "f":
        flat = np.where(np.isfinite(flat) & (flat > 0), flat, 0)
    elif flat.dtype.kind == "i":
        flat = np.maximum(flat, 0)
    counts = sp.csr_matrix(flat)
    return counts.astype(np.float64)


def _broadcast(obj: Any) -> Any:
    """``obj`` placed once on every worker of the current distributed client (else itself)."""
    try:
        from distributed import default_client

        client = default_client()
    except ValueError:  # no distributed client: the local scheduler shares memory
        return dask.delayed(obj)
    from dask.base import get_scheduler

    if get_scheduler() != client.get:  # a client exists, but another scheduler is chosen
        return dask.delayed(obj)
    return client.scatter(obj, broadcast=True, hash=False)


def _select(part: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: part[k] for k in keys if k in part}


@dataclass
class EMCIteration:
    """Results of one EMC iteration for B runs (B = 1 for a plain run).

    Attributes
    ----------
    iteration : int
        Iteration number (1 = first update of the start models).
    models, weights : ndarray, shape (B, K, S, S)
        Class averages (Dragonfly ``intens``) and merge weights (``inter_weight``).
    scale, likelihood, mutual_info : ndarray, shape (D, B)
        Per frame and run; NaN where a frame is not in the run.
    orientation : ndarray of int, shape (D, B)
        Most likely orientation r = j·K + k (−1 where not in the run).
    occupancy : ndarray, shape (D, B, K)
        Σ_j P_d,(j,k): class membership probabilities.
    probabilities : scipy.sparse.csr_matrix or None, shape (D, B·R)
        Probabilities above 1e-6, when requested.
    log_likelihood, mean_mutual_info, rms_change : ndarray, shape (B,)
        Mean over member frames; rms change of the models.
    beta_mean : float
        Mean β over frames.
    time_s : float
        Wall time of the iteration, seconds.
    """

    iteration: int
    models: np.ndarray
    weights: np.ndarray
    scale: np.ndarray
    orientation: np.ndarray
    occupancy: np.ndarray
    likelihood: np.ndarray
    mutual_info: np.ndarray
    probabilities: sp.csr_matrix | None
    log_likelihood: np.ndarray
    mean_mutual_info: np.ndarray
    rms_change: np.ndarray
    beta_mean: float
    time_s: float

    def to_dataset(self, run: int | None = None) -> xr.Dataset:
        """The iteration as an xarray Dataset (one run, or all with a ``run`` dimension)."""
        sel = slice(None) if run is None else run

        def per_frame(a: np.ndarray) -> Any:
            return a[:, sel]

        dims_f = ("frame",) if run is not None else ("frame", "run")
        dims_m = ("class", "model_x", "model_y") if run is not None else ("run", "class", "model_x", "model_y")
        return xr.Dataset(
            {
                "models": (dims_m, self.models[sel]),
                "weights": (dims_m, self.weights[sel]),
                "scale": (dims_f, per_frame(self.scale)),
                "orientation": (dims_f, per_frame(self.orientation)),
                "occupancy": (dims_f + ("class",), self.occupancy[:, sel]),
                "likelihood": (dims_f, per_frame(self.likelihood)),
                "mutual_info": (dims_f, per_frame(self.mutual_info)),
            },
            attrs={
                "iteration": self.iteration,
                "log_likelihood": np.atleast_1d(self.log_likelihood[sel]).tolist(),
                "rms_change": np.atleast_1d(self.rms_change[sel]).tolist(),
                "beta_mean": self.beta_mean,
                "time_s": self.time_s,
            },
        )


@dataclass
class EMCResult:
    """All iterations of a run; ``final`` is the last."""

    iterations: list[EMCIteration] = field(default_factory=list)
    operators: EMCOperators | None = None

    @property
    def final(self) -> EMCIteration:
        return self.iterations[-1]

    def write_dragonfly(self, directory: str, run: int = 0) -> list[str]:
        """Write each iteration as Dragonfly's ``output_NNN.h5`` in ``directory``; return the paths."""
        import os

        from diffdask.io.dragonfly import write_emc_output

        os.makedirs(directory, exist_ok=True)
        paths = []
        for it in self.iterations:
            path = os.path.join(directory, f"output_{it.iteration:03d}.h5")
            probs = None
            r = it.models.shape[1] * (self.operators.n_rotations if self.operators else 0)
            if it.probabilities is not None:
                block = it.probabilities[:, run * r : (run + 1) * r].tocsr()
                probs = (
                    [block.indices[block.indptr[d] : block.indptr[d + 1]] for d in range(block.shape[0])],
                    [block.data[block.indptr[d] : block.indptr[d + 1]] for d in range(block.shape[0])],
                )
            write_emc_output(
                path,
                it.models[run],
                inter_weight=it.weights[run],
                scale=it.scale[:, run],
                orientations=it.orientation[:, run],
                occupancies=it.occupancy[:, run],
                likelihood=it.likelihood[:, run],
                mutual_info=it.mutual_info[:, run],
                probabilities=probs,
                num_rot=r,
            )
            paths.append(path)
        return paths


class EMC2D:
    """2D expand–maximise–compress classification with in-plane rotations (Dragonfly's 2D EMC).

    Parameters
    ----------
    n_classes : int
        Number of class models K.
    n_rotations : int
        In-plane rotations J, θ_j = 2πj/J.
    friedel : bool
        Symmetrise models under q → −q after each iteration.
    need_scaling : bool
        Model a per-frame incident-fluence scale φ_d (updated every iteration).
    beta : float, optional
        Fixed starting β for every frame; default: Dragonfly's per-frame
        β_d = exp(−6.5 (N_d·10⁻⁵)^0.15) (with scaling) or the same from the mean count.
    beta_schedule : (float, int)
        β is multiplied by ``factor`` every ``period`` iterations (capped at 1).
    keep_probabilities : bool
        Keep the sparse per-frame probabilities (Dragonfly's ``probabilities`` group).

    Notes
    -----
    Equations: see `diffdask.emc.kernels`. Frames with no photons in the likelihood pixels are
    excluded with a warning (their results are NaN / −1).
    """

    def __init__(
        self,
        n_classes: int,
        n_rotations: int,
        friedel: bool = False,
        need_scaling: bool = True,
        beta: float | None = None,
        beta_schedule: tuple[float, int] = (2**0.5, 5),
        keep_probabilities: bool = False,
    ) -> None:
        if int(n_classes) < 1:
            raise ParameterError(f"n_classes must be ≥ 1, got {n_classes}.")
        if int(n_rotations) < 1:
            raise ParameterError(f"n_rotations must be ≥ 1, got {n_rotations}.")
        if beta is not None and not 0 < float(beta) <= 1:
            raise ParameterError(f"beta must be in (0, 1], got {beta}.")
        factor, period = beta_schedule
        if float(factor) <= 0 or int(period) < 1:
            raise ParameterError(f"beta_schedule must be (factor > 0, period ≥ 1), got {beta_schedule}.")
        self.n_classes, self.n_rotations = int(n_classes), int(n_rotations)
        self.friedel, self.need_scaling = bool(friedel), bool(need_scaling)
        self.beta = None if beta is None else float(beta)
        self.beta_schedule = (float(factor), int(period))
        self.keep_probabilities = bool(keep_probabilities)

    def run(
        self,
        ds: xr.Dataset,
        iterations: int,
        start_models: np.ndarray | None = None,
        seed: int = 0,
        start_scales: np.ndarray | None = None,
        start_iteration: int = 1,
        out: str | None = None,
        callback: Callable[[EMCIteration], None] | None = None,
    ) -> EMCResult:
        """Run EMC on a frame stack.

        Parameters
        ----------
        ds : xarray.Dataset
            Frame stack of photon counts: from `diffdask.io.read_emc` (Dragonfly pixels) or any
            stack with a `Geometry`.
        iterations : int
            Number of iterations to run.
        start_models : ndarray, shape (K, S, S), optional
            Start models (e.g. Dragonfly's ``output_000.h5`` ``intens``); random from ``seed``
            otherwise.
        seed : int
            Seed of the random start models.
        start_scales : ndarray, shape (D,), optional
            Known scale factors; without them the first iteration uses the mean-count rescale ρ.
        start_iteration : int
            Number of the first iteration (for β schedules when continuing a run).
        out : str, optional
            Zarr store to write each iteration into (group ``iter_NNN``).
        callback : callable, optional
            Called with each `EMCIteration` as it finishes (progress display).

        Returns
        -------
        EMCResult
        """
        job = _EMCJob(self, ds, n_runs=1)
        models = None if start_models is None else np.asarray(start_models, dtype=np.float64)[None]
        scales = None if start_scales is None else np.asarray(start_scales, dtype=np.float64)[:, None]
        return job.iterate(iterations, models, seed, scales, start_iteration, out, callback)


class _EMCJob:
    """Frames persisted as sparse chunks, operators, and per-frame constants of one EMC job."""

    def __init__(self, emc: EMC2D, ds: xr.Dataset, n_runs: int, member: np.ndarray | None = None) -> None:
        validate(ds)
        n_frames = int(ds.sizes["frame"])
        if emc.n_classes > n_frames:
            raise ParameterError(
                f"{emc.n_classes} classes for {n_frames} frames: every class needs frames to average; "
                f"use at most {n_frames} classes (a few frames per class at the least)."
            )
        self.emc = emc
        det = EMCDetector.from_dataset(ds)
        corr_mean = float(EMCDetector.from_dataset(ds, all_pixels=True).corr.mean())
        self.size = det.model_size
        self.ops = bilinear_operators(det.x, det.y, det.mask, det.corr, emc.n_rotations, self.size, corr_mean)
        self.n_used_pixels = int(np.sum(det.mask == 0))
        frames = ds["frames"].data
        blocks = frames.to_delayed().ravel()
        counts = [dask.delayed(_to_counts)(blk, det.pixels) for blk in blocks]
        self.counts = list(dask.persist(*counts))
        self.ops_d = _broadcast(self.ops)
        stats = dask.compute(*[dask.delayed(photon_stats)(c, self.ops.likelihood_pixels) for c in self.counts])
        self.chunk_sizes = [len(s[0]) for s in stats]
        self.photons = np.concatenate([s[0] for s in stats])
        self.sum_fact = np.concatenate([s[1] for s in stats])
        n_frames = self.photons.size
        empty = self.photons <= 0
        if empty.all():
            raise SchemaError("no frame has photons in the likelihood pixels; EMC needs data.")
        if empty.any():
            warnings.warn(
                f"{int(empty.sum())} of {n_frames} frames have no photons in the likelihood pixels; they are "
                "excluded from EMC (their results are NaN).",
                UserWarning,
                stacklevel=3,
            )
        base = np.ones((n_frames, n_runs), dtype=bool) if member is None else np.asarray(member, dtype=bool)
        self.member = base & ~empty[:, None]
        self.n_runs = n_runs
        self.mean_count = np.array([self.photons[self.member[:, b]].mean() for b in range(n_runs)])
        if emc.beta is not None:
            self.beta_start = np.full(n_frames, emc.beta)
        elif emc.need_scaling:
            self.beta_start = np.exp(-6.5 * (self.photons * 1e-5) ** 0.15)
        else:
            self.beta_start = np.full(n_frames, np.exp(-6.5 * (self.photons.mean() * 1e-5) ** 0.15))

    def _split(self, a: np.ndarray) -> list[np.ndarray]:
        return np.split(a, np.cumsum(self.chunk_sizes)[:-1])

    def start_models(self, models: np.ndarray | None, seed: int) -> np.ndarray:
        shape = (self.n_runs, self.emc.n_classes, self.size, self.size)
        if models is None:
            # Dragonfly's random start: uniform in [0, 2·mean photons per used pixel).
            mean = self.mean_count / max(1, self.n_used_pixels) * 2.0
            return np.stack(
                [np.random.default_rng([seed, b]).random(shape[1:]) * mean[b] for b in range(self.n_runs)]
            )
        if models.shape != shape:
            raise SchemaError(
                f"start models have shape {models.shape[1:]} but this detector and n_classes need "
                f"{shape[1:]} (K, S, S) with S = 2⌈max pixel radius⌉ + 3 = {self.size}."
            )
        if not np.all(np.isfinite(models)):
            raise SchemaError("start models hold NaN or inf values.")
        return models

    def iterate(
        self,
        iterations: int,
        models: np.ndarray | None,
        seed: int,
        scales: np.ndarray | None,
        start_iteration: int,
        out: str | None,
        callback: Callable[[EMCIteration], None] | None,
    ) -> EMCResult:
        if int(iterations) < 1:
            raise ParameterError(f"iterations must be ≥ 1, got {iterations}.")
        emc = self.emc
        models = self.start_models(models, seed)
        n_frames = self.photons.size
        known_scale = scales is not None
        if known_scale and scales.shape != (n_frames, self.n_runs):
            raise SchemaError(f"start_scales must have one value per frame ({n_frames}), got {scales.shape[:1]}.")
        scale = np.ones((n_frames, self.n_runs)) if scales is None else scales.copy()
        result = EMCResult(operators=self.ops)
        factor, period = emc.beta_schedule
        for it in range(int(start_iteration), int(start_iteration) + int(iterations)):
            t0 = time.perf_counter()
            beta = np.minimum(1.0, self.beta_start * factor ** ((it - 1) // period))
            use_rho = not (emc.need_scaling and (it > 1 or known_scale))
            models_d = dask.delayed(models)
            parts = []
            for counts, member, sc, ph, sf, be in zip(
                self.counts,
                self._split(self.member),
                self._split(scale),
                self._split(self.photons),
                self._split(self.sum_fact),
                self._split(beta),
            ):
                parts.append(
                    dask.delayed(emc_chunk)(
                        counts, member, sc, ph, sf, be, models_d, self.ops_d, self.mean_count,
                        use_rho, emc.need_scaling, emc.keep_probabilities,
                    )
                )
            sums = tree_combine([dask.delayed(_select)(p, _SUMS) for p in parts])
            merged = dask.delayed(compress)(
                dask.delayed(operator.getitem)(sums, "numerator"),
                dask.delayed(operator.getitem)(sums, "denominator"),
                self.ops_d,
                emc.n_classes,
                emc.friedel,
            )
            (new_models, weights), frame_parts = dask.compute(
                merged, [dask.delayed(_select)(p, _PER_FRAME) for p in parts]
            )
            per_frame = {
                k: np.concatenate([fp[k] for fp in frame_parts]) for k in _PER_FRAME if k != "probabilities"
            }
            probs = (
                sp.vstack([fp["probabilities"] for fp in frame_parts], format="csr")
                if emc.keep_probabilities
                else None
            )
            rms = np.sqrt(((new_models - models) ** 2).reshape(self.n_runs, -1).mean(axis=1))
            member = self.member
            record = EMCIteration(
                iteration=it,
                models=new_models,
                weights=weights,
                scale=per_frame["scale"],
                orientation=per_frame["orientation"],
                occupancy=per_frame["occupancy"],
                likelihood=per_frame["likelihood"],
                mutual_info=per_frame["mutual_info"],
                probabilities=probs,
                log_likelihood=np.array([per_frame["likelihood"][member[:, b], b].mean() for b in range(self.n_runs)]),
                mean_mutual_info=np.array(
                    [per_frame["mutual_info"][member[:, b], b].mean() for b in range(self.n_runs)]
                ),
                rms_change=rms,
                beta_mean=float(beta[member.any(axis=1)].mean()),
                time_s=time.perf_counter() - t0,
            )
            result.iterations.append(record)
            if out is not None:
                record.to_dataset(0 if self.n_runs == 1 else None).to_zarr(
                    out, group=f"iter_{it:03d}", mode="w", zarr_format=3, consolidated=False
                )
            if callback is not None:
                callback(record)
            models = new_models
            if emc.need_scaling:
                scale = np.where(member, np.nan_to_num(per_frame["scale"], nan=1.0), 1.0)
        return result

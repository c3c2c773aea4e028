"""Distributed 3D EMC orientation recovery (Dragonfly's ``emc`` with ``recon_type = 3d``).

Each iteration is one Dask graph over (frame block × rotation block) tasks, so a task holds at
most ``frame_block × rotation_block`` log-likelihoods whatever the quaternion level:

1. one task per rotation block slices the model (broadcast once) into log-tomograms ℓ and u;
   ρ = mean photons / Σ_r w_r u_r;
2. per (frame block, rotation block): L_dr and its per-frame maxima;
3. per frame block: the maxima combined; per pair: E_dr = exp(β(L − max L)) on the kept set;
4. per frame block: Σ_r E combined; per pair: P = E / Σ E, the information sums, Σ_d P φ_d and
   the M-step numerator Σ_d P̃_dr K_dt;
5. per rotation block: the numerators summed over frame blocks in a fixed tree and merged into
   3D; the grids summed over rotation blocks in a fixed tree; one small finalising step
   (divide, Friedel and point-group symmetry, scale normalisation) on the client.

Blocks are fixed sizes over the member frames and the rotation list, and every sum runs in a
fixed order, so the result depends on the data, the settings and the two block sizes only —
not on the input's chunks, the worker count, the CPU or the BLAS. Each iteration can be
checkpointed in Zarr; a resumed run ends with the bytes of an uninterrupted one.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import scipy.sparse as sp
import xarray as xr
from dask.base import tokenize

from diffdask.blocks import tree_combine
from diffdask.checks import check_int, check_seed
from diffdask.emc.checkpoint3d import Checkpoint
from diffdask.emc.detector3d import Detector3D
from diffdask.emc.emc2d import _broadcast, _to_counts
from diffdask.emc.kernels import photon_stats
from diffdask.emc.kernels3d import rotation_matrices, symmetrize_friedel, symmetrize_group
from diffdask.emc.quaternions import POINT_GROUPS, fundamental_zone, quaternion_set
from diffdask.emc.result3d import EMC3DIteration, EMC3DResult
from diffdask.emc.stages3d import (
    _combine_maxima,
    _combine_norms,
    _frame_results,
    _grid_sum,
    _merge,
    _rho,
    _stage_likelihood,
    _stage_posterior,
    _stage_weights,
    _Static,
    _sums,
    _tomograms,
    _transpose,
)
from diffdask.errors import ParameterError, SchemaError, StoreExistsError
from diffdask.frames import validate

#: Frames per E-step block (fixed, so results do not depend on the input's chunks).
FRAME_BLOCK = 512
#: Rotations per E-step block: a task's L and P are FRAME_BLOCK × ROTATION_BLOCK doubles (2 MiB).
ROTATION_BLOCK = 512

_PER_FRAME = ("orientation", "max_probability", "entropy", "scale", "likelihood", "mutual_info")


def _orientations(quaternions: Any, point_group: str) -> tuple[np.ndarray, np.ndarray]:
    from diffdask.io.dragonfly import read_quaternions

    if isinstance(quaternions, (str, os.PathLike)):
        q, w = read_quaternions(os.fspath(quaternions))
    elif isinstance(quaternions, tuple):
        q = np.asarray(quaternions[0], dtype=np.float64)
        w = np.asarray(quaternions[1], dtype=np.float64)
        if q.ndim != 2 or q.shape[1] != 4 or w.shape != (q.shape[0],) or q.shape[0] == 0:
            raise ParameterError(
                f"quaternions must be (R, 4) unit quaternions with R weights, got {q.shape} and {w.shape}."
            )
        if not np.allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6) or not np.all(w > 0):
            raise ParameterError("quaternions must have unit length and positive weights.")
        w = w / w.sum()
    else:
        q, w = quaternion_set(quaternions)
    if POINT_GROUPS.get(point_group) != "1":
        q, w = fundamental_zone(q, w, point_group)
    return q, w


class EMC3D:
    """3D expand–maximise–compress orientation recovery (Dragonfly's 3D EMC, Loh & Elser 2009).

    Parameters
    ----------
    quaternions : int, str or (ndarray, ndarray)
        The orientation set: a refinement level n of Dragonfly's 600-cell sampling
        (10(5n³+n) rotations, about 72°/n apart), a Dragonfly quaternion file, or
        ``(quaternions (R, 4), weights (R,))``.
    point_group : str
        ``"1"`` (none), ``"O"`` (cubes) or ``"I"`` (icosahedral viruses): orientations are
        reduced to the group's fundamental zone and the model is averaged over the group.
    need_scaling : bool
        Model and update a per-frame fluence scale φ_d.
    beta : float, optional
        Starting β in (0, 1] for every frame; default: Dragonfly's per-frame
        β_d = exp(−6.5 (N_d·10⁻⁵)^0.15) from the photon count.
    beta_schedule : (float, int)
        β is multiplied by ``factor`` every ``period`` iterations (capped at 1).
    friedel : bool
        Symmetrise the model under q → −q after each iteration (Dragonfly always does in 3D).
    truncation_threads : int, optional
        Reproduce Dragonfly ``emc -t T``: its probability cut (14/β below the maximum) is taken
        against each OpenMP thread's own maximum, thread = r mod T. None (default) cuts against
        the global maximum.
    size : int, optional
        Model edge S (default 2⌈max |q|⌉ + 3, Dragonfly's).
    keep_probabilities : bool
        Keep the sparse probabilities above 1e-6 (Dragonfly's ``probabilities`` group).
    frame_block, rotation_block : int
        Frames and rotations per task (memory per task ≈ 16 · frame_block · rotation_block
        bytes); the result depends on them only through the order of sums (≤ 1e-12).
    polarization : {"x", "y", "none"}
        Beam polarisation for stacks with a `Geometry`.
    tilt_rad : (float, float)
        Detector pitch and yaw for stacks with a `Geometry`.
    """

    def __init__(
        self,
        quaternions: int | str | tuple[np.ndarray, np.ndarray] = 4,
        point_group: str = "1",
        need_scaling: bool = True,
        beta: float | None = None,
        beta_schedule: tuple[float, int] = (2**0.5, 5),
        friedel: bool = True,
        truncation_threads: int | None = None,
        size: int | None = None,
        keep_probabilities: bool = False,
        frame_block: int = FRAME_BLOCK,
        rotation_block: int = ROTATION_BLOCK,
        polarization: str = "x",
        tilt_rad: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        if point_group not in POINT_GROUPS:
            raise ParameterError(f"unknown point group {point_group!r}; choose one of {', '.join(POINT_GROUPS)}.")
        self.quaternions, self.weights = _orientations(quaternions, point_group)
        self.point_group = point_group
        if beta is not None and not 0 < float(beta) <= 1:
            raise ParameterError(f"beta must be in (0, 1], got {beta}.")
        factor, period = beta_schedule
        if not float(factor) > 0 or int(period) < 1:
            raise ParameterError(f"beta_schedule must be (factor > 0, period ≥ 1), got {beta_schedule}.")
        self.need_scaling, self.friedel = bool(need_scaling), bool(friedel)
        self.beta = None if beta is None else float(beta)
        self.beta_schedule = (float(factor), int(period))
        self.truncation_threads = None if truncation_threads is None else check_int(
            "truncation_threads", truncation_threads, minimum=1, maximum=4096, what="threads")
        self.size = None if size is None else check_int("size", size, minimum=3, maximum=1024, what="voxels")
        self.keep_probabilities = bool(keep_probabilities)
        self.frame_block = check_int("frame_block", frame_block, minimum=1, what="frames")
        self.rotation_block = check_int("rotation_block", rotation_block, minimum=1, what="rotations")
        self.polarization, self.tilt_rad = polarization, tuple(tilt_rad)

    def settings_token(self) -> str:
        """A hash of everything that changes the result (checkpoints refuse other settings)."""
        return tokenize(self.quaternions, self.weights, self.point_group, self.need_scaling, self.beta,
                        self.beta_schedule, self.friedel, self.truncation_threads, self.size,
                        self.frame_block, self.rotation_block, self.polarization, self.tilt_rad)

    def run(
        self,
        ds: xr.Dataset,
        iterations: int,
        start_model: np.ndarray | None = None,
        seed: int = 0,
        start_scales: np.ndarray | None = None,
        start_iteration: int = 1,
        blacklist: np.ndarray | None = None,
        out: str | None = None,
        resume: bool = False,
        callback: Callable[[EMC3DIteration], None] | None = None,
    ) -> EMC3DResult:
        """Run 3D EMC on a frame stack of photon counts.

        Parameters
        ----------
        ds : xarray.Dataset
            From `diffdask.io.read_emc` (Dragonfly's q-vectors) or any stack with a `Geometry`.
        iterations : int
            Iterations to run (with ``resume``: the total, of which those in ``out`` are done).
        start_model : ndarray, shape (S, S, S), optional
            E.g. Dragonfly's ``output_000.h5`` ``intens[0]``; random from ``seed`` otherwise
            (uniform in [0, 2·mean photons per likelihood pixel), as Dragonfly).
        seed : int
        start_scales : ndarray, shape (D,), optional
            Known scales φ_d (used from the first iteration instead of ρ).
        start_iteration : int
            Number of the first iteration (β schedule when continuing a run).
        blacklist : ndarray of bool, shape (D,), optional
            Frames to leave out (True = excluded), e.g. a bootstrap subset's complement.
        out : str, optional
            Zarr store: each iteration is written as group ``iter_NNN`` as it finishes.
        resume : bool
            Continue the run checkpointed in ``out`` from its last complete iteration.
        callback : callable, optional
            Called with each `EMC3DIteration` as it finishes.
        """
        total = check_int("iterations", iterations, minimum=1, maximum=100_000, what="iterations")
        seed = check_seed(seed)
        job = _Job(self, ds, blacklist)
        result = EMC3DResult(quaternions=self.quaternions, weights=self.weights)
        first = check_int("start_iteration", start_iteration, minimum=1)
        model = job.start_model(start_model, seed)
        scales = None if start_scales is None else job.check_scales(start_scales)
        checkpoint = None
        if out is not None:
            checkpoint = Checkpoint(out, self.settings_token(), job.data_token)
            existed = checkpoint.exists()
            if existed and not resume:
                raise StoreExistsError(
                    f"{out!r} already exists; pass resume=True to continue the run checkpointed there, "
                    "or choose a new path."
                )
            checkpoint.create()
            if existed and checkpoint.load(result):
                last = result.final
                model, scales, first = last.model, last.scale, last.iteration + 1
        end = int(start_iteration) + total - 1
        for it in range(first, end + 1):
            record = job.iterate(it, model, scales)
            result.iterations.append(record)
            if checkpoint is not None:
                checkpoint.save(record, self.quaternions)
            if callback is not None:
                callback(record)
            model = record.model
            scales = record.scale if self.need_scaling else None
        if not result.iterations:
            raise ParameterError(f"nothing to run: {out!r} already holds {total} iterations; ask for more.")
        return result


class _Job:
    """Photons persisted in fixed frame blocks, the detector and the per-frame constants of a run."""

    def __init__(self, emc: EMC3D, ds: xr.Dataset, blacklist: np.ndarray | None) -> None:
        validate(ds)
        self.emc = emc
        n_frames = int(ds.sizes["frame"])
        if n_frames == 0:
            raise SchemaError("the frame stack holds no frames; 3D EMC needs data (is the photon file empty?).")
        det = Detector3D.from_dataset(ds, emc.polarization, emc.tilt_rad)
        self.size = emc.size or det.model_size
        det.check_fits(self.size)
        self.det = det
        if emc.truncation_threads is not None and emc.rotation_block % emc.truncation_threads:
            raise ParameterError(
                f"rotation_block ({emc.rotation_block}) must be a multiple of truncation_threads "
                f"({emc.truncation_threads})."
            )
        rot = rotation_matrices(emc.quaternions)
        starts = list(range(0, rot.shape[0], emc.rotation_block))
        log_prior = np.log(emc.weights)
        self.static = _Static(
            q=np.ascontiguousarray(det.q), corr=np.ascontiguousarray(det.corr), likelihood=det.mask == 0,
            rotations=[np.ascontiguousarray(rot[s : s + emc.rotation_block]) for s in starts],
            log_prior=[log_prior[s : s + emc.rotation_block] for s in starts], starts=starts, size=self.size,
            threads=emc.truncation_threads or 1,
        )
        excluded = np.zeros(n_frames, bool) if blacklist is None else np.asarray(blacklist, dtype=bool)
        if excluded.shape != (n_frames,):
            raise SchemaError(f"blacklist must have one entry per frame ({n_frames}), got shape {excluded.shape}.")
        candidates = np.flatnonzero(~excluded)
        counts, stats = self._load(ds["frames"].data, candidates)
        photons = np.concatenate([st[0] for st in stats])
        empty = photons <= 0
        if empty.any():
            warnings.warn(f"{int(empty.sum())} of {n_frames} frames have no photons in the likelihood pixels; "
                          "they are left out of 3D EMC (their results are NaN).", UserWarning, stacklevel=3)
            candidates = candidates[~empty]
            counts, stats = self._load(ds["frames"].data, candidates)
            photons = np.concatenate([st[0] for st in stats])
        self.n_frames = n_frames
        self.member = candidates
        self.counts = counts
        self.counts_t = list(dask.persist(*[dask.delayed(_transpose)(c) for c in counts]))
        self.chunk_sizes = [len(s[0]) for s in stats]
        self.photons = photons
        self.sum_fact = np.concatenate([s[1] for s in stats])
        self.mean_count = float(photons.mean())
        self.n_used_pixels = int(np.sum(self.static.likelihood))
        self.static_d = _broadcast(self.static)
        self.data_token = tokenize(ds["frames"].data.name, n_frames, candidates, det.q, det.corr, det.mask)
        if emc.beta is not None:
            self.beta_start = np.full(photons.size, emc.beta)
        elif emc.need_scaling:
            self.beta_start = np.exp(-6.5 * (photons * 1e-5) ** 0.15)
        else:
            self.beta_start = np.full(photons.size, np.exp(-6.5 * (self.mean_count * 1e-5) ** 0.15))

    def _load(self, frames: Any, candidates: np.ndarray) -> tuple[list[Any], tuple[Any, ...]]:
        """Photon counts of ``candidates`` persisted as CSR blocks of ``frame_block`` frames, and their stats."""
        if candidates.size == 0:
            raise SchemaError("no frame is left to use (all blacklisted or without photons in the likelihood "
                              "pixels, mask 0); 3D EMC needs frames with photons.")
        selected = frames[candidates].rechunk((self.emc.frame_block,) + frames.shape[1:])
        blocks = [dask.delayed(_to_counts)(blk, self.det.pixels) for blk in selected.to_delayed().ravel()]
        counts = list(dask.persist(*blocks))
        stats = dask.compute(*[dask.delayed(photon_stats)(c, self.static.likelihood) for c in counts])
        return counts, stats

    def _split(self, a: np.ndarray) -> list[np.ndarray]:
        return np.split(a, np.cumsum(self.chunk_sizes)[:-1])

    def start_model(self, model: np.ndarray | None, seed: int) -> np.ndarray:
        shape = (self.size,) * 3
        if model is None:
            scale = 2.0 * self.mean_count / max(1, self.n_used_pixels)
            return np.random.default_rng(seed).random(shape) * scale
        model = np.asarray(model, dtype=np.float64)
        if model.shape != shape:
            raise SchemaError(
                f"the start model has shape {model.shape} but this detector needs {shape} "
                f"(S = 2⌈max |q|⌉ + 3 = {self.size}, or the size you set)."
            )
        if not np.all(np.isfinite(model)) or np.any(model < 0):
            raise SchemaError("the start model must be finite and non-negative (it is an intensity).")
        return model

    def check_scales(self, scales: np.ndarray) -> np.ndarray:
        scales = np.asarray(scales, dtype=np.float64)
        if scales.shape != (self.n_frames,):
            raise SchemaError(f"start_scales must have one value per frame ({self.n_frames}), got {scales.shape}.")
        return scales

    def iterate(self, it: int, model: np.ndarray, scales: np.ndarray | None) -> EMC3DIteration:
        emc, static = self.emc, self.static
        t0 = time.perf_counter()
        factor, period = emc.beta_schedule
        beta = np.minimum(1.0, self.beta_start * factor ** ((it - 1) // period))
        use_rho = not (emc.need_scaling and scales is not None)
        phi_all = np.ones(self.photons.size) if not emc.need_scaling or scales is None else scales[self.member]
        model_d = _broadcast(model)
        n_blocks = len(static.starts)
        tomos = [dask.delayed(_tomograms, pure=True)(model_d, self.static_d, b) for b in range(n_blocks)]
        rho = dask.delayed(_rho)(tomos, self.static_d, self.mean_count)
        frame_parts, per_block = [], [[] for _ in range(n_blocks)]
        for counts, counts_t, phi, be, ph, sf in zip(self.counts, self.counts_t, self._split(phi_all),
                                                     self._split(beta), self._split(self.photons),
                                                     self._split(self.sum_fact)):
            penalty = None if use_rho else phi
            lik = [dask.delayed(_stage_likelihood)(counts, tomos[b], self.static_d, b, penalty, rho)
                   for b in range(n_blocks)]
            maxima = dask.delayed(_combine_maxima)(lik)
            weights = [dask.delayed(_stage_weights)(lik[b], maxima, be, tomos[b], self.static_d, b)
                       for b in range(n_blocks)]
            norms = dask.delayed(_combine_norms)(weights)
            posts = [dask.delayed(_stage_posterior)(weights[b], norms, counts_t, phi, self.static_d, b,
                                                    emc.keep_probabilities) for b in range(n_blocks)]
            for b in range(n_blocks):
                per_block[b].append(dask.delayed(_sums)(posts[b]))
            frame_parts.append(dask.delayed(_frame_results)(maxima, norms, posts, ph, sf, rho,
                                                            emc.keep_probabilities))
        merged = [dask.delayed(_merge)(tree_combine(parts), self.static_d, b) for b, parts in enumerate(per_block)]
        grids, frames, rho_value = dask.compute(tree_combine(merged, _grid_sum), frame_parts, rho)
        return self._finish(it, model, grids, frames, float(rho_value), beta, t0)

    def _finish(self, it: int, model: np.ndarray, grids: dict[str, np.ndarray], frames: list[dict[str, Any]],
                rho: float, beta: np.ndarray, t0: float) -> EMC3DIteration:
        emc, size = self.emc, self.size
        weight = grids["weight"].reshape((size,) * 3)
        merged = np.divide(grids["num"].reshape((size,) * 3), weight, out=np.zeros((size,) * 3), where=weight > 0)
        if emc.friedel:
            merged = symmetrize_friedel(merged, weight)
        merged = symmetrize_group(merged, weight, emc.point_group)
        per = {k: np.concatenate([f[k] for f in frames]) for k in _PER_FRAME}
        mean_scale = float(per["scale"].mean()) if emc.need_scaling else 1.0
        rms = mean_scale * float(np.sqrt(np.mean((merged - model) ** 2)))
        if emc.need_scaling:
            merged = merged * mean_scale
            per["scale"] = per["scale"] / mean_scale
        else:
            per["scale"] = np.ones_like(per["scale"])
        full = {}
        for k, v in per.items():
            fill = -1 if k == "orientation" else np.nan
            arr = np.full(self.n_frames, fill, dtype=v.dtype)
            arr[self.member] = v
            full[k] = arr
        probs = None
        if emc.keep_probabilities:
            stacked = sp.vstack([f["probabilities"] for f in frames], format="csr")
            rows = np.zeros(self.n_frames + 1, dtype=np.int64)
            rows[self.member + 1] = np.diff(stacked.indptr)
            probs = sp.csr_matrix((stacked.data, stacked.indices, np.cumsum(rows)),
                                  shape=(self.n_frames, stacked.shape[1]))
        return EMC3DIteration(
            iteration=it, model=merged, weights=weight, probabilities=probs,
            log_likelihood=float(per["likelihood"].mean()), mean_mutual_info=float(per["mutual_info"].mean()),
            rms_change=rms, beta_mean=float(beta.mean()), rho=rho, time_s=time.perf_counter() - t0, **full,
        )

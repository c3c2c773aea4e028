"""The task functions of one 3D EMC iteration's Dask graph (see `diffdask.emc.emc3d`).

Each takes and returns plain NumPy/SciPy objects; `_Static` is what every task reads and no
iteration changes, placed once on every worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffdask.emc.kernels import SPARSE_P_DENSITY, sparse_dense
from diffdask.emc.kernels3d import (
    block_maxima,
    exp_weights,
    log_likelihood_block,
    merge_block,
    posterior,
    slice_tomograms,
)


@dataclass(frozen=True, eq=False)
class _Static:
    """What every task of a run needs and nothing changes: placed once on every worker."""

    q: np.ndarray
    corr: np.ndarray
    likelihood: np.ndarray
    rotations: list[np.ndarray]
    log_prior: list[np.ndarray]
    starts: list[int]
    size: int
    threads: int


def _tomograms(model: np.ndarray, static: _Static, b: int) -> tuple[np.ndarray, np.ndarray]:
    return slice_tomograms(model, static.rotations[b], static.q, static.corr, static.likelihood)


def _rho(tomos: Sequence[tuple[np.ndarray, np.ndarray]], static: _Static, mean_count: float) -> float:
    total = 0.0
    for (_, u), log_prior in zip(tomos, static.log_prior):
        total += float(np.sum(np.exp(log_prior) * u))
    return mean_count / total


def _stage_likelihood(counts: sp.csr_matrix, tomo: tuple[np.ndarray, np.ndarray], static: _Static, b: int,
                      penalty: np.ndarray | None, rho: float) -> dict[str, Any]:
    log_w, u = tomo
    a = np.full(counts.shape[0], rho) if penalty is None else penalty
    loglik = log_likelihood_block(counts, log_w, static.log_prior[b], a, u)
    per_thread, best, arg = block_maxima(loglik, static.starts[b], static.threads)
    return {"loglik": loglik, "per_thread": per_thread, "best": best, "arg": arg}


def _combine_maxima(parts: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    per_thread = parts[0]["per_thread"].copy()
    best, arg = parts[0]["best"].copy(), parts[0]["arg"].copy()
    for p in parts[1:]:
        np.maximum(per_thread, p["per_thread"], out=per_thread)
        better = p["best"] > best  # strict: ties keep the lower rotation, as a single loop would
        best[better], arg[better] = p["best"][better], p["arg"][better]
    return {"per_thread": per_thread, "best": best, "arg": arg}


def _stage_weights(part: dict[str, Any], maxima: dict[str, np.ndarray], beta: np.ndarray,
                   tomo: tuple[np.ndarray, np.ndarray], static: _Static, b: int) -> dict[str, np.ndarray]:
    expw, norm, sum_el, sum_eu = exp_weights(part["loglik"], maxima["best"], maxima["per_thread"], beta, tomo[1],
                                             static.starts[b])
    return {"expw": expw, "norm": norm, "sum_el": sum_el, "sum_eu": sum_eu}


def _combine_norms(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: parts[0][k].copy() for k in ("norm", "sum_el", "sum_eu")}
    for p in parts[1:]:
        for k in out:
            out[k] += p[k]
    return out


def _stage_posterior(part: dict[str, np.ndarray], norms: dict[str, np.ndarray], counts_t: sp.csr_matrix,
                     phi: np.ndarray, static: _Static, b: int, keep_probabilities: bool) -> dict[str, Any]:
    trimmed, plogp, plogw, denom, nnz = posterior(part["expw"], norms["norm"], static.log_prior[b], phi)
    if nnz < SPARSE_P_DENSITY * trimmed.size:
        # Once β has grown few rotations per frame stay, and a sparse P makes Kᵀ·P cost
        # Σ_d nnz(K_d)·nnz(P_d) instead of nnz(K)·Rb.
        sparse = sp.csr_matrix(trimmed)
        numerator = (counts_t @ sparse).toarray()
    else:
        sparse = sp.csr_matrix(trimmed) if keep_probabilities else None
        numerator = sparse_dense(counts_t, trimmed)
    out: dict[str, Any] = {"numerator": numerator, "denominator": denom, "plogp": plogp, "plogw": plogw}
    if keep_probabilities:
        out["probabilities"] = sparse
    return out


def _sums(part: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"numerator": part["numerator"], "denominator": part["denominator"]}


def _merge(sums: dict[str, np.ndarray], static: _Static, b: int) -> dict[str, np.ndarray]:
    denom = sums["denominator"]
    active = denom > 0
    views = sums["numerator"] / np.where(active, denom, np.inf)[None, :]
    views /= static.corr[:, None]
    num, weight = merge_block(views, active, static.rotations[b], static.q, static.size)
    return {"num": num, "weight": weight}


def _frame_results(maxima: dict[str, np.ndarray], norms: dict[str, np.ndarray], posts: Sequence[dict[str, Any]],
                   photons: np.ndarray, sum_fact: np.ndarray, rho: float, keep_probabilities: bool) -> dict[str, Any]:
    plogp = posts[0]["plogp"].copy()
    plogw = posts[0]["plogw"].copy()
    for p in posts[1:]:
        plogp += p["plogp"]
        plogw += p["plogw"]
    norm = norms["norm"]
    out: dict[str, Any] = {
        "orientation": maxima["arg"],
        "max_probability": 1.0 / norm,
        "entropy": -plogp,
        "mutual_info": plogp - plogw,
        "likelihood": norms["sum_el"] / norm - sum_fact,
        "scale": photons / (rho * (norms["sum_eu"] / norm)),
    }
    if keep_probabilities:
        out["probabilities"] = sp.hstack([p["probabilities"] for p in posts], format="csr")
    return out


def _grid_sum(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: parts[0][k].copy() for k in parts[0]}
    for p in parts[1:]:
        for k in out:
            out[k] += p[k]
    return out


def _transpose(counts: sp.csr_matrix) -> sp.csr_matrix:
    return counts.T.tocsr()

"""3D EMC kernels: tomograms sliced from the model, the per-block E-step, the merge, symmetries.

Notation (Dragonfly's, see ``shared/data/dragonfly_emc3d/README.md`` §6): frames d, pixels t,
rotations r with active matrices R_r and weights w_r, model I on an S³ grid with centre
c = S // 2, flat voxel index ix·S² + iy·S + iz.

- Slice: pixel t of rotation r samples p = R_rᵀ q_t + c trilinearly, with the C cast's
  truncation toward zero; W_rt = corr_t · I(p), and pixels whose cell leaves the grid give
  W = 0 (Dragonfly: DBL_MIN). ℓ_rt = log W_rt for W > 0 and mask 0, else 0; u_r = Σ_{mask 0} W_rt.
- E-step per (frame block, rotation block): L_dr = log w_r − a_d u_r + Σ_t K_dt ℓ_rt, the photon
  sum as a sparse × dense product in a fixed order (`sparse_dense`), so the bits depend only on
  the data and the block sizes, never on the CPU or the thread count.
- Merge: v = W'_rt / corr_t spread with the same eight trilinear weights into a numerator grid,
  the weights into ``inter_weight``; rotations with no probability are skipped.

Everything is float64, the summation order fixed by the loops (no ``fastmath``).
"""

from __future__ import annotations

import numba
import numpy as np

from diffdask.emc.kernels import PDIFF_THRESH, PROB_MIN, column_blocks, sparse_dense
from diffdask.emc.quaternions import group_quaternions
from diffdask.simulate.common import quaternion_to_matrix

__all__ = ["PDIFF_THRESH", "PROB_MIN"]


def rotation_matrices(quaternions: np.ndarray) -> np.ndarray:
    """Active rotation matrices R(q) of unit quaternions (w, x, y, z), float64, shape (R, 3, 3)."""
    return np.ascontiguousarray(quaternion_to_matrix(np.asarray(quaternions, dtype=np.float64)))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _slice(model: np.ndarray, rot: np.ndarray, q: np.ndarray, corr: np.ndarray, likelihood: np.ndarray,
           log_w: np.ndarray, u: np.ndarray) -> None:  # pragma: no cover - compiled
    size = model.shape[0]
    c = size // 2
    n_rot = rot.shape[0]
    for t in range(q.shape[0]):
        qx, qy, qz = q[t, 0], q[t, 1], q[t, 2]
        for r in range(n_rot):
            # p = Rᵀ q + c: column a of R dotted with q.
            px = rot[r, 0, 0] * qx + rot[r, 1, 0] * qy + rot[r, 2, 0] * qz + c
            py = rot[r, 0, 1] * qx + rot[r, 1, 1] * qy + rot[r, 2, 1] * qz + c
            pz = rot[r, 0, 2] * qx + rot[r, 1, 2] * qy + rot[r, 2, 2] * qz + c
            ix, iy, iz = int(px), int(py), int(pz)
            value = 0.0
            if 0 <= ix <= size - 2 and 0 <= iy <= size - 2 and 0 <= iz <= size - 2:
                fx, fy, fz = px - ix, py - iy, pz - iz
                gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                value = (
                    gx * gy * gz * model[ix, iy, iz] + gx * gy * fz * model[ix, iy, iz + 1]
                    + gx * fy * gz * model[ix, iy + 1, iz] + gx * fy * fz * model[ix, iy + 1, iz + 1]
                    + fx * gy * gz * model[ix + 1, iy, iz] + fx * gy * fz * model[ix + 1, iy, iz + 1]
                    + fx * fy * gz * model[ix + 1, iy + 1, iz] + fx * fy * fz * model[ix + 1, iy + 1, iz + 1]
                ) * corr[t]
            if likelihood[t]:
                u[r] += value
                log_w[t, r] = np.log(value) if value > 0.0 else 0.0
            else:
                log_w[t, r] = 0.0


def slice_tomograms(
    model: np.ndarray, rot: np.ndarray, q: np.ndarray, corr: np.ndarray, likelihood: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Log-tomograms and their sums for a block of rotations.

    Parameters
    ----------
    model : ndarray, shape (S, S, S)
    rot : ndarray, shape (Rb, 3, 3)
        Active rotation matrices.
    q : ndarray, shape (T, 3)
        Pixel q-vectors, voxels.
    corr : ndarray, shape (T,)
        Normalised solid angle × polarisation.
    likelihood : ndarray of bool, shape (T,)
        Pixels with mask 0.

    Returns
    -------
    log_w : ndarray, shape (T, Rb)
        ℓ_rt, pixel-major (the dense operand of the photon product).
    u : ndarray, shape (Rb,)
        Σ_{t: mask 0} W_rt.
    """
    log_w = np.empty((q.shape[0], rot.shape[0]))
    u = np.zeros(rot.shape[0])
    _slice(np.ascontiguousarray(model, dtype=np.float64), rot, q, corr, likelihood, log_w, u)
    return log_w, u


def log_likelihood_block(counts: object, log_w: np.ndarray, log_prior: np.ndarray, penalty: np.ndarray,
                         u: np.ndarray) -> np.ndarray:
    """L_dr = log w_r − a_d u_r + Σ_t K_dt ℓ_rt for a (frame block × rotation block), shape (n, Rb).

    ``counts`` is the block's (n × T) CSR photon matrix, ``penalty`` the per-frame a_d (ρ or φ_d).
    """
    loglik = sparse_dense(counts, column_blocks(log_w))
    loglik += log_prior[None, :]
    loglik -= np.multiply.outer(penalty, u)
    return loglik


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _merge(views: np.ndarray, active: np.ndarray, rot: np.ndarray, q: np.ndarray, size: int,
           num: np.ndarray, weight: np.ndarray) -> None:  # pragma: no cover - compiled
    c = size // 2
    s2 = size * size
    for r in range(rot.shape[0]):
        if not active[r]:
            continue
        for t in range(q.shape[0]):
            qx, qy, qz = q[t, 0], q[t, 1], q[t, 2]
            px = rot[r, 0, 0] * qx + rot[r, 1, 0] * qy + rot[r, 2, 0] * qz + c
            py = rot[r, 0, 1] * qx + rot[r, 1, 1] * qy + rot[r, 2, 1] * qz + c
            pz = rot[r, 0, 2] * qx + rot[r, 1, 2] * qy + rot[r, 2, 2] * qz + c
            ix, iy, iz = int(px), int(py), int(pz)
            if not (0 <= ix <= size - 2 and 0 <= iy <= size - 2 and 0 <= iz <= size - 2):
                continue
            fx, fy, fz = px - ix, py - iy, pz - iz
            gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
            v = views[t, r]
            base = ix * s2 + iy * size + iz
            for a in range(2):
                wa = fx if a else gx
                for b in range(2):
                    wb = wa * (fy if b else gy)
                    for e in range(2):
                        w = wb * (fz if e else gz)
                        k = base + a * s2 + b * size + e
                        num[k] += w * v
                        weight[k] += w


def merge_block(views: np.ndarray, active: np.ndarray, rot: np.ndarray, q: np.ndarray, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Numerator and interpolation-weight grids (flat, S³) of one rotation block's updated tomograms.

    ``views`` (T, Rb) holds W'_rt / corr_t; ``active`` marks the rotations with Σ_d P_dr φ_d > 0.
    """
    num = np.zeros(size**3)
    weight = np.zeros(size**3)
    _merge(np.ascontiguousarray(views), np.ascontiguousarray(active), rot, q, int(size), num, weight)
    return num, weight


def symmetrize_friedel(model: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """I(v) ← (I g)(v) + (I g)(v̄) over g(v) + g(v̄), v̄ = 2c − v (0 where both weights are 0).

    For an even edge the first plane of each axis has no partner and is left as it is.
    """
    start = 1 if model.shape[-1] % 2 == 0 else 0
    core = (slice(start, None),) * 3
    m, w = model[core], weight[core]
    num = m * w + np.flip(m * w)
    den = w + np.flip(w)
    out = model.copy()
    out[core] = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _rotate_add(values: np.ndarray, rot: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    # out(v) += values(R v) by trilinear interpolation about the centre (0 outside the grid).
    size = values.shape[0]
    c = size // 2
    for i in range(size):
        for j in range(size):
            for k in range(size):
                x, y, z = i - c, j - c, k - c
                px = rot[0, 0] * x + rot[0, 1] * y + rot[0, 2] * z + c
                py = rot[1, 0] * x + rot[1, 1] * y + rot[1, 2] * z + c
                pz = rot[2, 0] * x + rot[2, 1] * y + rot[2, 2] * z + c
                if px < 0 or py < 0 or pz < 0:
                    continue
                ix, iy, iz = int(px), int(py), int(pz)
                if ix > size - 1 or iy > size - 1 or iz > size - 1:
                    continue
                fx, fy, fz = px - ix, py - iy, pz - iz
                jx, jy, jz = min(ix + 1, size - 1), min(iy + 1, size - 1), min(iz + 1, size - 1)
                gx, gy, gz = 1.0 - fx, 1.0 - fy, 1.0 - fz
                out[i, j, k] += (
                    gx * gy * gz * values[ix, iy, iz] + gx * gy * fz * values[ix, iy, jz]
                    + gx * fy * gz * values[ix, jy, iz] + gx * fy * fz * values[ix, jy, jz]
                    + fx * gy * gz * values[jx, iy, iz] + fx * gy * fz * values[jx, iy, jz]
                    + fx * fy * gz * values[jx, jy, iz] + fx * fy * fz * values[jx, jy, jz]
                )


def symmetrize_group(model: np.ndarray, weight: np.ndarray, point_group: str) -> np.ndarray:
    """Weighted average of the model over a point group's rotations: Σ_g (I g)(R_g v) / Σ_g g(R_g v).

    Rotations that permute the grid (all of O's about the centre) are exact index
    permutations; the others (icosahedral) interpolate trilinearly.
    """
    mats = rotation_matrices(group_quaternions(point_group))
    if mats.shape[0] == 1:
        return model
    weighted = np.ascontiguousarray(model * weight)
    weight = np.ascontiguousarray(weight, dtype=np.float64)
    num = np.zeros_like(weighted)
    den = np.zeros_like(weighted)
    size = model.shape[0]
    for rot in mats:
        rounded = np.rint(rot)
        if np.allclose(rot, rounded, atol=1e-12) and size % 2 == 1:
            # R v over the centred grid: a signed permutation of the axes.
            axes = [int(np.flatnonzero(rounded[a])[0]) for a in range(3)]
            signs = [rounded[a, axes[a]] for a in range(3)]
            perm = np.argsort(axes)
            for name, src, dst in (("num", weighted, num), ("den", weight, den)):
                del name
                view = src
                for a in range(3):
                    if signs[a] < 0:
                        view = np.flip(view, axis=axes[a])
                dst += np.transpose(view, perm)
        else:
            _rotate_add(weighted, np.ascontiguousarray(rot), num)
            _rotate_add(weight, np.ascontiguousarray(rot), den)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def block_maxima(loglik: np.ndarray, r0: int, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Per frame of a block: the maximum of L over the rotations r ≡ τ (mod ``threads``) of each
    τ, shape (n, threads), the block's largest L and its first rotation (global index r0 + j)."""
    n, width = loglik.shape
    per_thread = np.full((n, threads), -np.inf)
    best = np.full(n, -np.inf)
    arg = np.full(n, -1, dtype=np.int64)
    for d in range(n):
        for j in range(width):
            v = loglik[d, j]
            tau = (r0 + j) % threads
            if v > per_thread[d, tau]:
                per_thread[d, tau] = v
            if v > best[d]:
                best[d] = v
                arg[d] = r0 + j
    return per_thread, best, arg


@numba.njit(cache=True, nogil=True, boundscheck=False)
def exp_weights(loglik: np.ndarray, lmax: np.ndarray, cut_max: np.ndarray, beta: np.ndarray, u: np.ndarray,
                r0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """E_dr = exp(β_d (L_dr − max_r L_dr)) where L_dr > M_dτ − 14/β_d (τ = r mod threads, M the
    maxima ``cut_max`` of shape (n, threads)), else 0; with per-frame Σ_r E, Σ_r E·L and Σ_r E·u_r."""
    n, width = loglik.shape
    threads = cut_max.shape[1]
    expw = np.zeros((n, width))
    norm = np.zeros(n)
    sum_el = np.zeros(n)
    sum_eu = np.zeros(n)
    for d in range(n):
        b = beta[d]
        cut = PDIFF_THRESH / b
        for j in range(width):
            v = loglik[d, j]
            if v > cut_max[d, (r0 + j) % threads] - cut:
                e = np.exp(b * (v - lmax[d]))
                expw[d, j] = e
                norm[d] += e
                sum_el[d] += e * v
                sum_eu[d] += e * u[j]
    return expw, norm, sum_el, sum_eu


@numba.njit(cache=True, nogil=True, boundscheck=False)
def posterior(expw: np.ndarray, norm: np.ndarray, log_prior: np.ndarray, phi: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:  # pragma: no cover - compiled
    """Probabilities of a block and their sums, in one pass.

    Returns the probabilities above `PROB_MIN` (n, Rb) (the M-step's P̃), per frame
    Σ_{P ≥ 1e-6} P log P and Σ_{P ≥ 1e-6} P log w_r (mutual information = their difference,
    entropy = −the first), per rotation Σ_d P_dr φ_d over all kept P, and the count of P̃ > 0.
    """
    n, width = expw.shape
    trimmed = np.zeros((n, width))
    plogp = np.zeros(n)
    plogw = np.zeros(n)
    denom = np.zeros(width)
    nnz = 0
    for d in range(n):
        inv = norm[d]
        for j in range(width):
            e = expw[d, j]
            if e == 0.0:
                continue
            p = e / inv
            denom[j] += p * phi[d]
            if p >= PROB_MIN:
                plogp[d] += p * np.log(p)
                plogw[d] += p * log_prior[j]
                if p > PROB_MIN:
                    trimmed[d, j] = p
                    nnz += 1
    return trimmed, plogp, plogw, denom, nnz

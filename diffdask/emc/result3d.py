"""Results of a 3D EMC run: one `EMC3DIteration` per iteration, gathered in an `EMC3DResult`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import xarray as xr


@dataclass
class EMC3DIteration:
    """Results of one 3D EMC iteration.

    Attributes
    ----------
    iteration : int
    model, weights : ndarray, shape (S, S, S)
        Intensity model (Dragonfly ``intens``) and merge weights (``inter_weight``).
    orientation : ndarray of int, shape (D,)
        Most likely rotation (row of the quaternion list; −1 for frames not used).
    max_probability, entropy, scale, likelihood, mutual_info : ndarray, shape (D,)
        Per frame (NaN for frames not used): the most likely rotation's probability, the
        orientation entropy −Σ P log P (nats), the fluence scale φ_d, Σ_r P_dr (L_dr − Σ log K!)
        and Σ_r P_dr log(P_dr / w_r) (nats), over P ≥ 1e-6.
    probabilities : scipy.sparse.csr_matrix or None, shape (D, R)
        Probabilities above 1e-6, when requested.
    log_likelihood, mean_mutual_info, rms_change, beta_mean, rho, time_s : float
        Means over used frames, the model's rms change, the mean β, the rescale ρ and the wall time (s).
    """

    iteration: int
    model: np.ndarray
    weights: np.ndarray
    orientation: np.ndarray
    max_probability: np.ndarray
    entropy: np.ndarray
    scale: np.ndarray
    likelihood: np.ndarray
    mutual_info: np.ndarray
    probabilities: sp.csr_matrix | None
    log_likelihood: float
    mean_mutual_info: float
    rms_change: float
    beta_mean: float
    rho: float
    time_s: float

    def to_dataset(self, quaternions: np.ndarray) -> xr.Dataset:
        """This iteration as an xarray Dataset (model on (qx, qy, qz) voxels, per-frame results)."""
        size = self.model.shape[0]
        axis = np.arange(size) - size // 2
        used = self.orientation >= 0
        quat = np.full((self.orientation.size, 4), np.nan)
        quat[used] = quaternions[self.orientation[used]]
        return xr.Dataset(
            {
                "model": (("qx", "qy", "qz"), self.model),
                "weights": (("qx", "qy", "qz"), self.weights),
                "orientation": ("frame", self.orientation),
                "quaternion": (("frame", "component"), quat),
                "max_probability": ("frame", self.max_probability),
                "entropy": ("frame", self.entropy),
                "scale": ("frame", self.scale),
                "likelihood": ("frame", self.likelihood),
                "mutual_info": ("frame", self.mutual_info),
            },
            coords={"qx": axis, "qy": axis, "qz": axis, "component": ["w", "x", "y", "z"]},
            attrs={
                "iteration": self.iteration,
                "log_likelihood": self.log_likelihood,
                "mutual_info": self.mean_mutual_info,
                "rms_change": self.rms_change,
                "beta_mean": self.beta_mean,
                "rho": self.rho,
                "time_s": self.time_s,
            },
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> EMC3DIteration:
        """The iteration `to_dataset` wrote (without probabilities)."""
        per_frame = ("model", "weights", "orientation", "max_probability", "entropy", "scale", "likelihood",
                     "mutual_info")
        return cls(
            iteration=int(ds.attrs["iteration"]), probabilities=None,
            **{k: ds[k].values for k in per_frame},
            log_likelihood=float(ds.attrs["log_likelihood"]), mean_mutual_info=float(ds.attrs["mutual_info"]),
            rms_change=float(ds.attrs["rms_change"]), beta_mean=float(ds.attrs["beta_mean"]),
            rho=float(ds.attrs["rho"]), time_s=float(ds.attrs["time_s"]),
        )


@dataclass
class EMC3DResult:
    """The iterations of a 3D EMC run with its orientation set; ``final`` is the last."""

    iterations: list[EMC3DIteration] = field(default_factory=list)
    quaternions: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def final(self) -> EMC3DIteration:
        return self.iterations[-1]

    def to_dataset(self) -> xr.Dataset:
        """The final model and per-frame results, with the per-iteration log-likelihood, mutual
        information, rms change, β, ρ and time on an ``iteration`` axis."""
        ds = self.final.to_dataset(self.quaternions)
        history = {
            "log_likelihood": [it.log_likelihood for it in self.iterations],
            "mean_mutual_info": [it.mean_mutual_info for it in self.iterations],
            "rms_change": [it.rms_change for it in self.iterations],
            "beta_mean": [it.beta_mean for it in self.iterations],
            "rho": [it.rho for it in self.iterations],
            "time_s": [it.time_s for it in self.iterations],
        }
        return ds.assign({k: ("iteration", np.array(v)) for k, v in history.items()}).assign_coords(
            iteration=[it.iteration for it in self.iterations]
        )

    def write_dragonfly(self, directory: str) -> list[str]:
        """Write each iteration as Dragonfly's ``output_NNN.h5`` in ``directory``; return the paths."""
        from diffdask.io.dragonfly import write_emc_output

        os.makedirs(directory, exist_ok=True)
        paths = []
        for it in self.iterations:
            path = os.path.join(directory, f"output_{it.iteration:03d}.h5")
            probs = None
            if it.probabilities is not None:
                p = it.probabilities
                probs = ([p.indices[p.indptr[d] : p.indptr[d + 1]] for d in range(p.shape[0])],
                         [p.data[p.indptr[d] : p.indptr[d + 1]] for d in range(p.shape[0])])
            write_emc_output(path, it.model[None], inter_weight=it.weights[None], scale=it.scale,
                             orientations=it.orientation, likelihood=it.likelihood, mutual_info=it.mutual_info,
                             probabilities=probs, num_rot=self.quaternions.shape[0])
            paths.append(path)
        return paths

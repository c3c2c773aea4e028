"""Absolute embedding: a network that places any average in an existing CLPCA space.

CLPCA coordinates are relative to the set of averages they were computed from, and the CC
matrix costs O(M²). Following Zhuang et al. 2022 §2.2.3, each average is described by
features invariant to in-plane rotation — |FFT| along the azimuth of its polar resampling
at every radius, odd orders dropped (Friedel symmetry makes them vanish) and orders above
what the radius resolves dropped — and a fully connected network (512-128-64-32 hidden
units) learns features → CLPCA coordinates; it then embeds new averages lazily, block by
block, in O(M).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffdask._version import __version__
from diffdask.backend import array_namespace, to_cpu
from diffdask.blocks import map_frames
from diffdask.commonlines.lines import (
    apply_operator,
    as_average_stack,
    interpolation_operator,
    nonfinite_message,
)
from diffdask.errors import ParameterError
from diffdask.geometry import polar_grid

HIDDEN = (512, 128, 64, 32)


def feature_grid(
    size: int, mask_radius: float = 20, n_radii: int | None = None, n_angles: int | None = None
) -> dict[str, Any]:
    """The polar grid and kept FFT orders of `rotation_invariant_features`.

    Parameters
    ----------
    size : int
        Side S of the averages (centre at ``S // 2``), pixels.
    mask_radius : float
        Innermost radius (pixels).
    n_radii : int, optional
        Radii from ``mask_radius`` to the largest circle in the image; default 1 px spacing.
    n_angles : int, optional
        Azimuthal samples; default the smallest even number ≥ 2π·r_max, so the outer circle
        is sampled at least once per pixel.

    Returns
    -------
    dict
        ``rows``, ``cols`` (n_angles, n_radii) sampling indices, ``radii_px``, ``orders``
        (n_angles // 2 + 1,) and ``keep`` (orders × radii, bool): even orders m ≤ π·r, the
        highest a circle of 2πr pixels resolves.
    """
    center = size // 2
    r_max = float(min(center, size - 1 - center))
    if not 0 <= float(mask_radius) < r_max - 1:
        raise ParameterError(
            f"mask_radius must be in [0, {r_max - 1:g}) px for {size}×{size} averages, got {mask_radius!r}."
        )
    n_radii = int(n_radii) if n_radii is not None else int(r_max - math.floor(mask_radius)) + 1
    n_angles = int(n_angles) if n_angles is not None else 2 * math.ceil(math.pi * r_max)
    if n_radii < 2 or n_angles < 4:
        raise ParameterError(f"need n_radii ≥ 2 and n_angles ≥ 4, got {n_radii}, {n_angles}.")
    rows, cols, radii, _ = polar_grid((size, size), (center, center), n_radii, n_angles, r_max, float(mask_radius))
    orders = np.arange(n_angles // 2 + 1)
    keep = (orders[:, None] % 2 == 0) & (orders[:, None] <= math.pi * radii[None, :])
    return {"rows": rows, "cols": cols, "radii_px": radii, "orders": orders, "keep": keep}


def _features_block(block: Any, *, op: Any, keep: np.ndarray, n_angles: int) -> dict[str, Any]:
    xp = array_namespace(block)
    bad = ~xp.isfinite(block)
    if bool(bad.any()):
        raise ParameterError(nonfinite_message(int(bad.sum()), np.flatnonzero(to_cpu(bad.any(axis=(1, 2))))))
    total = block.sum(axis=(1, 2))
    polar = apply_operator(op, block / xp.where(total == 0, 1, total)[:, None, None])
    polar = polar.reshape(block.shape[0], n_angles, -1)
    spectrum = xp.abs(xp.fft.rfft(polar, axis=1)) / n_angles
    return {"features": spectrum[:, xp.asarray(keep)]}




def rotation_invariant_features(
    averages: Any,
    mask_radius: float = 20,
    n_radii: int | None = None,
    n_angles: int | None = None,
    interp: str = "bilinear",
    block_size: int | None = None,
) -> Any:
    """Features of each average that do not change under in-plane rotation, lazily.

    The average is divided by its sum, resampled on a polar grid (`diffdask.geometry.polar_grid`
    about ``(S // 2, S // 2)``), and Fourier-transformed along the azimuth at each radius;
    the magnitudes |F_m(r)| of the even orders m ≤ π·r are kept.

    Parameters
    ----------
    averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
        ``(M, S, S)`` averages (or a frame stack of them).
    mask_radius, n_radii, n_angles
        See `feature_grid`.
    interp : {"nearest", "bilinear"}
        Interpolation of the polar resampling.
    block_size : int, optional
        Averages per Dask chunk.

    Returns
    -------
    dask.array.Array, shape (M, n_features), float64
        Fractions of the average's total intensity; ordered by order m, then radius.
    """
    stack = as_average_stack(averages, None, block_size)
    grid = feature_grid(stack.size, mask_radius, n_radii, n_angles)
    op = interpolation_operator(grid["rows"], grid["cols"], stack.size, interp)
    n_features = int(grid["keep"].sum())
    return map_frames(
        _features_block,
        stack.data,
        {"features": ((n_features,), np.float64)},
        kwargs={"op": op, "keep": grid["keep"], "n_angles": grid["rows"].shape[0]},
        name="rotation-invariant-features",
    )["features"]


def _forward(x: Any, weights: Sequence[tuple[Any, Any]]) -> Any:
    """The MLP in the array library of ``x``: ReLU between linear layers, none after the last."""
    xp = array_namespace(x)
    for k, (w, b) in enumerate(weights):
        x = x @ xp.asarray(w).T + xp.asarray(b)
        if k < len(weights) - 1:
            x = xp.maximum(x, 0)
    return x


def _embed_block(block: Any, *, features: dict[str, Any], scaling: dict[str, np.ndarray], layers: list) -> dict[str, Any]:
    xp = array_namespace(block)
    raw = _features_block(block, **features)["features"]
    x = (xp.log(raw + scaling["floor"]) - xp.asarray(scaling["x_mean"])) / xp.asarray(scaling["x_std"])
    y = _forward(x.astype(xp.float32), layers).astype(xp.float64)
    return {"coordinates": y * xp.asarray(scaling["y_std"]) + xp.asarray(scaling["y_mean"])}


class AbsoluteEmbedding:
    """A network from rotation-invariant features of an average to its CLPCA coordinates.

    Parameters
    ----------
    mask_radius : float
        Inner radius of the features (pixels); usually that of the CC matrix.
    n_radii, n_angles : int, optional
        Polar grid of the features (see `feature_grid`).
    hidden : sequence of int
        Hidden layer widths (the paper's 512-128-64-32).
    epochs : int
        Passes over the training averages (Adam, mini-batches).
    batch_size : int
        Averages per gradient step.
    learning_rate : float
        Adam step size.
    weight_decay : float
        L2 penalty of Adam.
    validation_fraction : float
        Share of the averages held out to report the validation error (the paper's 20 %).
    seed : int
        Seeds the split, the initial weights and the batch order: the same seed gives the
        same network.
    threads : int
        torch threads while training. A network this small gains nothing from more, and on
        a node shared with Dask workers extra spinning threads made training ~20× slower.

    Attributes
    ----------
    validation_mse_ : ndarray, shape (n_components,)
        Mean squared error of each coordinate on the held-out averages (CLPCA units).
    training_mse_ : ndarray, shape (n_components,)
        The same on the training averages.
    validation_index_ : ndarray of int
        Which averages were held out.

    Notes
    -----
    `fit` computes the features and trains in this process (training is iterative and small:
    features of 10⁴ averages fit in memory); `transform` is lazy and runs block by block on
    the cluster, with the weights stored once in the graph.
    """

    def __init__(
        self,
        mask_radius: float = 20,
        n_radii: int | None = None,
        n_angles: int | None = None,
        hidden: Sequence[int] = HIDDEN,
        epochs: int = 300,
        batch_size: int = 64,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.2,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        if not 0 < float(validation_fraction) < 1:
            raise ParameterError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
        if int(epochs) < 1 or int(batch_size) < 1 or int(threads) < 1 or not all(int(h) >= 1 for h in hidden):
            raise ParameterError("epochs, batch_size, threads and hidden layer widths must be ≥ 1.")
        self.params = {
            "mask_radius": float(mask_radius),
            "n_radii": n_radii,
            "n_angles": n_angles,
            "hidden": [int(h) for h in hidden],
            "epochs": int(epochs),
            "batch_size": int(batch_size),
            "learning_rate": float(learning_rate),
            "weight_decay": float(weight_decay),
            "validation_fraction": float(validation_fraction),
            "seed": int(seed),
            "threads": int(threads),
        }
        self.size: int | None = None
        self.n_components: int | None = None
        self.state: dict[str, Any] | None = None
        self.validation_mse_: np.ndarray | None = None
        self.training_mse_: np.ndarray | None = None
        self.validation_index_: np.ndarray | None = None

    # ------------------------------------------------------------------ network
    def _network(self, n_in: int, n_out: int) -> Any:
        import torch

        widths = [n_in, *self.params["hidden"], n_out]
        layers: list[Any] = []
        for k in range(len(widths) - 1):
            layers.append(torch.nn.Linear(widths[k], widths[k + 1]))
            if k < len(widths) - 2:
                layers.append(torch.nn.ReLU())
        return torch.nn.Sequential(*layers)

    def _feature_kwargs(self) -> dict[str, Any]:
        grid = feature_grid(self.size, self.params["mask_radius"], self.params["n_radii"], self.params["n_angles"])
        op = interpolation_operator(grid["rows"], grid["cols"], self.size, "bilinear")
        return {"op": op, "keep": grid["keep"], "n_angles": grid["rows"].shape[0]}

    def fit(self, averages: Any, coordinates: Any) -> AbsoluteEmbedding:
        """Train on averages and their CLPCA coordinates (80/20 split by default).

        Parameters
        ----------
        averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
            The ``(M, S, S)`` averages the CLPCA space was computed from.
        coordinates : array_like, shape (M, n_components)
            Their CLPCA coordinates (`clpca(cc).coordinates`).

        Returns
        -------
        AbsoluteEmbedding
            ``self``, with ``validation_mse_`` set.
        """
        import torch

        stack = as_average_stack(averages)
        y = np.asarray(coordinates, dtype=np.float64)
        m = stack.data.shape[0]
        if y.ndim != 2 or y.shape[0] != m:
            raise ParameterError(f"coordinates must be (M, n_components) with M = {m} averages, got {y.shape}.")
        n_val = int(round(m * self.params["validation_fraction"]))
        if n_val < 1 or m - n_val < 2:
            raise ParameterError(f"{m} averages are too few to split into training and validation sets.")
        self.size, self.n_components = stack.size, y.shape[1]
        kwargs = self._feature_kwargs()
        raw = np.asarray(
            map_frames(
                _features_block, stack.data, {"features": ((int(kwargs["keep"].sum()),), np.float64)}, kwargs=kwargs
            )["features"].compute()
        )
        order = np.random.default_rng(self.params["seed"]).permutation(m)
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        # Feature magnitudes span decades from the centre out: a log with a floor, then
        # per-feature standardisation from the training averages only.
        floor = 1e-6 * float(raw[train].max()) if raw[train].max() > 0 else 1.0
        logs = np.log(raw + floor)
        x_mean, x_std = logs[train].mean(0), logs[train].std(0)
        x_std = np.where(x_std > 0, x_std, 1.0)
        y_mean, y_std = y[train].mean(0), y[train].std(0)
        y_std = np.where(y_std > 0, y_std, 1.0)
        x = torch.as_tensor((logs - x_mean) / x_std, dtype=torch.float32)
        t = torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.params["threads"])
        try:
            self.state = self._train(x, t, train)
        finally:
            torch.set_num_threads(threads)
        self.state.update(
            {
                name: torch.as_tensor(np.atleast_1d(value), dtype=torch.float64)
                for name, value in {
                    "floor": floor, "x_mean": x_mean, "x_std": x_std, "y_mean": y_mean, "y_std": y_std
                }.items()
            }
        )
        predicted = np.asarray(self.transform(stack.data).compute())
        self.validation_index_ = val
        self.validation_mse_ = ((predicted[val] - y[val]) ** 2).mean(0)
        self.training_mse_ = ((predicted[train] - y[train]) ** 2).mean(0)
        return self

    def _train(self, x: Any, t: Any, train: np.ndarray) -> dict[str, Any]:
        """Adam on mini-batches of the training rows of ``x`` → ``t``; the trained state dict."""
        import torch

        # A private RNG stream: the seed fixes the weights without touching the caller's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.params["seed"])
            net = self._network(x.shape[1], t.shape[1])
            optimiser = torch.optim.Adam(
                net.parameters(), lr=self.params["learning_rate"], weight_decay=self.params["weight_decay"]
            )
            shuffle = torch.Generator().manual_seed(self.params["seed"])
            rows = torch.as_tensor(train)
            for _ in range(self.params["epochs"]):
                for batch in rows[torch.randperm(len(train), generator=shuffle)].split(self.params["batch_size"]):
                    optimiser.zero_grad()
                    loss = torch.nn.functional.mse_loss(net(x[batch]), t[batch])
                    loss.backward()
                    optimiser.step()
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    # ------------------------------------------------------------------ inference
    def _require_fitted(self) -> None:
        if self.state is None:
            raise ParameterError("this AbsoluteEmbedding is not trained: call fit(averages, coordinates) or load(path).")

    def transform(self, averages: Any, block_size: int | None = None) -> Any:
        """CLPCA coordinates of (new) averages, lazily, block by block.

        Parameters
        ----------
        averages : array_like, dask.array.Array, xarray.Dataset, str or os.PathLike
            ``(M, S, S)`` averages of the size the network was trained on.
        block_size : int, optional
            Averages per Dask chunk.

        Returns
        -------
        dask.array.Array, shape (M, n_components), float64
        """
        self._require_fitted()
        stack = as_average_stack(averages, None, block_size)
        if stack.size != self.size:
            raise ParameterError(
                f"the network was trained on {self.size}×{self.size} averages, got {stack.size}×{stack.size}; "
                "crop or resample them about their centre to that size."
            )
        linear = [k.removesuffix(".weight") for k in self.state if k.endswith(".weight")]
        layers = [(self.state[f"{name}.weight"].numpy(), self.state[f"{name}.bias"].numpy()) for name in linear]
        scaling = {k: self.state[k].numpy() for k in ("floor", "x_mean", "x_std", "y_mean", "y_std")}
        return map_frames(
            _embed_block,
            stack.data,
            {"coordinates": ((self.n_components,), np.float64)},
            kwargs={"features": self._feature_kwargs(), "scaling": scaling, "layers": layers},
            name="absolute-embedding",
        )["coordinates"]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write the weights (``torch.save`` of the state dict) and a JSON sidecar.

        Parameters
        ----------
        path : str or Path
            Weights file, e.g. ``landscape.pt``; the sidecar is ``landscape.json``.

        Returns
        -------
        Path
            The sidecar's path.
        """
        import torch

        self._require_fitted()
        path = Path(path)
        torch.save(self.state, path)
        sidecar = path.with_suffix(".json")
        meta = {
            "params": self.params,
            "size": self.size,
            "n_components": self.n_components,
            "validation_mse": self.validation_mse_.tolist(),
            "training_mse": self.training_mse_.tolist(),
            "validation_index": self.validation_index_.tolist(),
            "weights": path.name,
            "diffdask_version": __version__,
        }
        sidecar.write_text(json.dumps(meta, indent=2))
        return sidecar

    @classmethod
    def load(cls, path: str | Path) -> AbsoluteEmbedding:
        """Read a network written by `save` (weights loaded with ``weights_only=True``)."""
        import torch

        from diffdask.errors import StoreNotFoundError

        path = Path(path)
        sidecar = path.with_suffix(".json")
        for p in (path, sidecar):
            if not p.exists():
                raise StoreNotFoundError(f"{p} does not exist; save a trained AbsoluteEmbedding there first.")
        meta = json.loads(sidecar.read_text())
        model = cls(**meta["params"])
        model.size, model.n_components = int(meta["size"]), int(meta["n_components"])
        model.state = torch.load(path, weights_only=True)
        model.validation_mse_ = np.asarray(meta["validation_mse"])
        model.training_mse_ = np.asarray(meta["training_mse"])
        model.validation_index_ = np.asarray(meta["validation_index"], dtype=np.int64)
        return model

"""Neural networks for diffraction frames (torch): hit classifier, geometry regressor, MLP heads.

- `HitClassifier`: the pre-activation ResNet of Assalauova et al. (2022) for single vs
  non-single hits: 192×96 input patch, 16 initial filters doubling at each strided-convolution
  downsampling up to 256, eight pre-activation residual blocks (BatchNorm → LeakyReLU → conv),
  global average pooling, a linear 2-way head.
- `GeometryRegressor`: a ResNet-18-style regressor of the beam centre (y, x in pixels) and the
  detector pitch/yaw (degrees), optionally conditioned on distance, wavelength and pixel size.
- `MLPHead`: a small fully connected head reused by other models.

Every architecture is registered by name so a weights file's JSON sidecar can rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffdask.errors import ParameterError

ARCHITECTURES: dict[str, type[nn.Module]] = {}


def register(cls: type[nn.Module]) -> type[nn.Module]:
    """Make ``cls`` loadable from a sidecar naming it."""
    ARCHITECTURES[cls.__name__] = cls
    return cls


def _check_layout(width: int, blocks_per_stage: Sequence[int]) -> None:
    if int(width) < 1:
        raise ParameterError(f"width (filters of the first stage) must be ≥ 1, got {width}.")
    if len(blocks_per_stage) < 1 or min(blocks_per_stage) < 1:
        raise ParameterError(f"blocks_per_stage must be positive counts, got {blocks_per_stage}.")


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): BN → LeakyReLU → conv, twice, plus skip."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, slope: float = 0.01) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.act = nn.LeakyReLU(slope)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(x))
        # The projection shortcut takes the pre-activated input, as in the pre-activation paper.
        skip = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act(self.bn2(out)))
        return out + skip


@register
class HitClassifier(nn.Module):
    """Pre-activation ResNet classifying single hits (output: 2 logits, [single, other]).

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a diffraction pattern).
    width : int
        Filters of the first stage (16 in the paper); doubled at each downsampling up to 16·width.
    blocks_per_stage : sequence of int
        Residual blocks per stage; the paper's eight blocks over five stages by default.
    n_classes : int
        Output classes.
    slope : float
        LeakyReLU negative slope.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 1, 1),
        n_classes: int = 2,
        slope: float = 0.01,
    ) -> None:
        super().__init__()
        _check_layout(width, blocks_per_stage)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        layers: list[nn.Module] = []
        channels = width
        for stage, n_blocks in enumerate(blocks_per_stage):
            out = width * 2**stage
            for i in range(n_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(PreActBlock(channels, out, stride, slope))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU(slope)
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn(self.blocks(self.stem(x))))
        return self.head(out.mean(dim=(2, 3)))


class BasicBlock(nn.Module):
    """ResNet-18 basic block (post-activation)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
            if stride != 1 or in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register
class MLPHead(nn.Module):
    """Fully connected head: Linear → ReLU for each hidden width, then a linear output."""

    def __init__(self, in_features: int, out_features: int, hidden: Sequence[int] = (128,)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register
class GeometryRegressor(nn.Module):
    """ResNet-18-style regressor: beam centre (y, x, pixels) and pitch, yaw (degrees).

    Parameters
    ----------
    in_channels : int
        Input channels.
    width : int
        Filters of the first stage (64 in ResNet-18).
    blocks_per_stage : sequence of int
        Basic blocks per stage, (2, 2, 2, 2) for ResNet-18.
    n_conditions : int
        Length of an optional conditioning vector (e.g. distance, wavelength, pixel size)
        concatenated to the pooled features before the head; 0 for none.
    n_outputs : int
        Regressed values (4: beam_center_y, beam_center_x, pitch_deg, yaw_deg).
    coordinates : bool
        Append two input channels holding each pixel's row and column (scaled to [−1, 1]),
        "CoordConv" (Liu et al. 2018). Convolutions and global average pooling are blind to
        where a feature sits, yet the beam centre *is* a position: without these channels the
        network can only read it from the padding at the edges, which is slow to learn.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 64,
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        n_conditions: int = 0,
        n_outputs: int = 4,
        coordinates: bool = True,
    ) -> None:
        super().__init__()
        _check_layout(width, blocks_per_stage)
        self.coordinates = bool(coordinates)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels + 2 * self.coordinates, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        layers: list[nn.Module] = []
        channels = width
        for stage, n_blocks in enumerate(blocks_per_stage):
            out = width * 2**stage
            for i in range(n_blocks):
                layers.append(BasicBlock(channels, out, 2 if (stage > 0 and i == 0) else 1))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.n_conditions = int(n_conditions)
        self.head = MLPHead(channels + self.n_conditions, n_outputs, hidden=(256,))

    def forward(self, x: torch.Tensor, conditions: torch.Tensor | None = None) -> torch.Tensor:
        if self.coordinates:
            n, _, h, w = x.shape
            rows = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device).view(1, 1, h, 1).expand(n, 1, h, w)
            cols = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device).view(1, 1, 1, w).expand(n, 1, h, w)
            x = torch.cat([x, rows, cols], dim=1)
        features = self.blocks(self.stem(x)).mean(dim=(2, 3))
        if self.n_conditions:
            if conditions is None or conditions.shape[-1] != self.n_conditions:
                raise ParameterError(f"this regressor needs {self.n_conditions} condition values per frame.")
            features = torch.cat([features, conditions.to(features.dtype)], dim=1)
        return self.head(features)


def build(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate a registered architecture by name."""
    if architecture not in ARCHITECTURES:
        raise ParameterError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[architecture](**kwargs)

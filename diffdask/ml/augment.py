"""Training-time augmentations of network inputs (torch, batched, seeded).

The recipe of Assalauova et al. (2022): rotation, scaling, elastic deformation, gamma, Gaussian
noise and blur, mirroring, shifts and cutout, each applied to a sample with its own probability.
Geometric transforms are one ``grid_sample`` per batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Probabilities and ranges of each augmentation (0 disables one).

    Attributes
    ----------
    p_rotate, max_rotate_deg : float
        In-plane rotation.
    p_scale, scale_range : float, (float, float)
        Isotropic zoom.
    p_shift, max_shift_fraction : float
        Translation, as a fraction of the patch size.
    p_elastic, elastic_alpha, elastic_sigma : float
        Elastic deformation: smooth random displacements of ``alpha`` pixels, correlation ``sigma``.
    p_gamma, gamma_range : float, (float, float)
        Gamma correction of the (non-negative) input.
    p_noise, noise_sigma : float
        Additive Gaussian noise (input units).
    p_blur, blur_sigma : float
        Gaussian blur, pixels.
    p_mirror : float
        Left–right mirror.
    p_cutout, cutout_fraction : float
        Zero a random rectangle of this size fraction.
    """

    p_rotate: float = 0.2
    max_rotate_deg: float = 15.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.85, 1.15)
    p_shift: float = 0.2
    max_shift_fraction: float = 0.05
    p_elastic: float = 0.1
    elastic_alpha: float = 2.0
    elastic_sigma: float = 4.0
    p_gamma: float = 0.2
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.15
    noise_sigma: float = 0.02
    p_blur: float = 0.1
    blur_sigma: float = 1.0
    p_mirror: float = 0.5
    p_cutout: float = 0.1
    cutout_fraction: float = 0.2

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``(n, c, h, w)``; each sample draws its own transforms from ``generator``."""
        n, _, h, w = x.shape

        def draw(p: float) -> torch.Tensor:
            return torch.rand(n, generator=generator) < p

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        angle = torch.where(draw(self.p_rotate), uniform(-1, 1) * math.radians(self.max_rotate_deg), torch.zeros(n))
        zoom = torch.where(draw(self.p_scale), uniform(*self.scale_range), torch.ones(n))
        shift = torch.where(draw(self.p_shift)[:, None], (torch.rand(n, 2, generator=generator) * 2 - 1)
                            * 2 * self.max_shift_fraction, torch.zeros(n, 2))
        mirror = draw(self.p_mirror)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        sign = torch.where(mirror, -1.0, 1.0)
        theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1), torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        elastic = draw(self.p_elastic)
        if elastic.any():
            field = torch.randn(n, 2, h, w, generator=generator)
            field = _blur(field, self.elastic_sigma) * (2 * self.elastic_alpha / max(h, w))
            grid = grid + torch.where(elastic[:, None, None, None], field.permute(0, 2, 3, 1), torch.zeros_like(grid))
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        gamma = torch.where(draw(self.p_gamma), uniform(*self.gamma_range), torch.ones(n))
        x = x.clamp_min(0) ** gamma[:, None, None, None]
        blur = draw(self.p_blur)
        if blur.any():
            x = torch.where(blur[:, None, None, None], _blur(x, self.blur_sigma), x)
        noise = draw(self.p_noise)
        x = x + noise[:, None, None, None] * self.noise_sigma * torch.randn(x.shape, generator=generator)
        cut = draw(self.p_cutout)
        if cut.any():
            ch, cw = max(1, int(h * self.cutout_fraction)), max(1, int(w * self.cutout_fraction))
            top = (torch.rand(n, generator=generator) * (h - ch + 1)).long()
            left = (torch.rand(n, generator=generator) * (w - cw + 1)).long()
            rows = torch.arange(h)[None, :, None]
            cols = torch.arange(w)[None, None, :]
            box = ((rows >= top[:, None, None]) & (rows < (top + ch)[:, None, None])
                   & (cols >= left[:, None, None]) & (cols < (left + cw)[:, None, None]))
            x = torch.where((box & cut[:, None, None])[:, None], torch.zeros_like(x), x)
        return x


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel, ``sigma`` in pixels."""
    radius = max(1, int(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)

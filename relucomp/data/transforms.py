"""Image transforms written in torch / PIL / numpy (no torchvision).

Images are stored as ``uint8`` tensors ``N x 3 x H x W``.  Training-time
augmentation is the CIFAR recipe: zero-pad by 4, random ``H x W`` crop, random
horizontal flip.  Padding is applied to the ``[0, 1]`` image *before*
normalisation, so the pad is black, exactly like torchvision's
``RandomCrop(padding=4)`` followed by ``Normalize``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "center_square",
    "resize_uint8",
    "channel_stats",
    "normalize",
    "random_crop_flip",
    "random_crop_flip_batch",
]


def center_square(im: Image.Image) -> Image.Image:
    """Crop the largest centred square out of ``im`` (no-op if already square)."""
    w, h = im.size
    if w == h:
        return im
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize ``N x 3 x H x W`` uint8 images to ``size x size`` with PIL bilinear.

    Non-square images are centre-cropped to a square first (aspect ratio kept).
    Returns a new contiguous ``N x 3 x size x size`` uint8 array.
    """
    n, c, h, w = images.shape
    if h == size and w == size:
        return np.ascontiguousarray(images)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    hwc = images.transpose(0, 2, 3, 1)
    for i in range(n):
        im = center_square(Image.fromarray(np.ascontiguousarray(hwc[i])))
        out[i] = np.asarray(im.resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
    return out


def channel_stats(images: Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and std of uint8 ``N x 3 x H x W`` images scaled to [0, 1].

    Exact, from a 256-bin histogram per channel (no float copy of the data).
    """
    if images.shape[0] == 0:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = hist.sum()
        mean = (hist * levels).sum() / total
        var = ((hist * levels.square()).sum() / total - mean.square()).clamp_min(0.0)
        means.append(float(mean))
        stds.append(max(float(var.sqrt()), 1e-3))
    return tuple(means), tuple(stds)  # type: ignore[return-value]


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """``(x - mean) / std`` per channel for ``3 x H x W`` or ``N x 3 x H x W`` float input."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop with zero padding plus random horizontal flip of one ``C x H x W`` image."""
    _, h, w = x.shape
    r = torch.randint(0, 2 * padding + 1, (2,), generator=generator)
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        top, left = int(r[0]), int(r[1])
        x = padded[:, top : top + h, left : left + w]
    if flip:
        x = x.flip(-1)
    return x.contiguous()


def random_crop_flip_batch(x: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Vectorised :func:`random_crop_flip` for an ``N x C x H x W`` batch (independent per image)."""
    n, c, h, w = x.shape
    if n == 0:
        return x
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding)) if padding > 0 else x
    tops = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    lefts = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool()
    rows = tops.view(n, 1) + torch.arange(h).view(1, h)  # n x h
    cols = lefts.view(n, 1) + torch.arange(w).view(1, w)  # n x w
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
    idx_n = torch.arange(n).view(n, 1, 1, 1)
    idx_c = torch.arange(c).view(1, c, 1, 1)
    out = padded[idx_n, idx_c, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    return out.contiguous()

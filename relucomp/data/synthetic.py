"""A procedurally generated, deterministic 10-class image set with unequal groups.

No files needed: this is the default data set, used by tests, demos and CI.

* 10 classes of patterns at a random position / size / angle: horizontal,
  vertical and diagonal (45 or 135 deg) stripes (each +-15 deg), a dot grid,
  disk, ring, square, cross, checkerboard, triangle.  Every class is closed
  under horizontal flips, so the standard flip augmentation keeps labels valid.
  A small distractor blob is added to every image.
* 3 groups ``A`` / ``B`` / ``C`` with 70 / 20 / 10 % of the images (classes
  balanced inside each group).  They look different and the minorities are
  genuinely harder:

  ===== ============================ ================= ======== ======
  group palette                      background        contrast noise
  ===== ============================ ================= ======== ======
  A     saturated warm colours        flat              0.65-1.0 0.06
  B     cool greens / blues           sinusoidal texture 0.50-0.85 0.10
  C     muted, near-grey              texture + blur    0.45-0.70 0.15
  ===== ============================ ================= ======== ======

  so a model trained on the pooled data does best on ``A`` and compression
  (fewer ReLUs) costs ``C`` the most.

The labels and groups depend only on ``n``; pixels on ``n`` and ``size``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CLASS_NAMES", "GROUP_NAMES", "GROUP_FRACTIONS", "DEFAULT_SIZE", "make_synthetic", "synthetic_labels"]

CLASS_NAMES = [
    "hstripes",
    "vstripes",
    "diagstripes",
    "dots",
    "disk",
    "ring",
    "square",
    "cross",
    "checker",
    "triangle",
]
GROUP_NAMES = ["A", "B", "C"]
GROUP_FRACTIONS = (0.7, 0.2, 0.1)
DEFAULT_SIZE = 6000
DATA_SEED = 20240917

# per group: contrast range, noise sigma, texture amplitude, blur
_GROUP_STYLE = {
    0: dict(contrast=(0.65, 1.0), noise=0.06, texture=0.0, blur=False),
    1: dict(contrast=(0.50, 0.85), noise=0.10, texture=0.10, blur=False),
    2: dict(contrast=(0.45, 0.70), noise=0.15, texture=0.08, blur=True),
}


def _group_counts(n: int) -> list[int]:
    counts = [int(np.floor(n * f)) for f in GROUP_FRACTIONS]
    rem = n - sum(counts)
    fracs = [n * f - c for f, c in zip(GROUP_FRACTIONS, counts)]
    for g in np.argsort(fracs, kind="stable")[::-1][:rem]:
        counts[g] += 1
    return counts


def synthetic_labels(n: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, groups)`` of the first-stage draw: exact 70/20/10 groups, balanced classes."""
    rng = np.random.default_rng([DATA_SEED, n])
    labels, groups = [], []
    for g, c in enumerate(_group_counts(n)):
        labels.append(np.arange(c) % len(CLASS_NAMES))
        groups.append(np.full(c, g))
    labels_a = np.concatenate(labels).astype(np.int64)
    groups_a = np.concatenate(groups).astype(np.int64)
    perm = rng.permutation(n)
    return labels_a[perm], groups_a[perm]


def _palette(group: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB colours in [0, 1] per image."""
    n = len(group)
    hue = rng.random(n)
    fg = np.empty((n, 3))
    bg = np.empty((n, 3))
    # A: warm saturated hues (red..yellow) on dark blue-grey
    # B: greens/blues on a mid-dark teal
    # C: desaturated (near grey) colours on grey
    hue_a = 0.0 + 0.16 * hue
    hue_b = 0.30 + 0.30 * hue
    hue_c = hue
    h = np.where(group == 0, hue_a, np.where(group == 1, hue_b, hue_c))
    sat = np.where(group == 0, 0.85, np.where(group == 1, 0.6, 0.2)) * (0.8 + 0.2 * rng.random(n))
    val = 0.75 + 0.25 * rng.random(n)
    fg[:] = _hsv_to_rgb(h, sat, val)
    bg_base = np.where(
        (group == 0)[:, None],
        np.array([0.12, 0.14, 0.25]),
        np.where((group == 1)[:, None], np.array([0.10, 0.28, 0.30]), np.array([0.35, 0.35, 0.37])),
    )
    bg[:] = np.clip(bg_base + 0.06 * rng.standard_normal((n, 3)), 0, 1)
    # randomly swap fg/bg brightness order for 25 % so polarity is not a cue
    swap = rng.random(n) < 0.25
    fg[swap], bg[swap] = bg[swap].copy(), fg[swap].copy()
    return fg, bg


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ],
        0,
    )
    return table[i, np.arange(len(h))]


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Anti-aliased step: 1 inside (d < 0), 0 outside, ~1 pixel transition."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def make_synthetic(n: int = DEFAULT_SIZE, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images uint8 n x 3 x size x size, labels int64 n, groups int64 n)``; deterministic."""
    labels, groups = synthetic_labels(n)
    rng = np.random.default_rng([DATA_SEED, n, 1])
    px = 2.0 / size  # one pixel in [-1, 1] coordinates
    lin = (np.arange(size) + 0.5) * px - 1.0
    yy, xx = np.meshgrid(lin, lin, indexing="ij")
    yy = yy[None].astype(np.float32)
    xx = xx[None].astype(np.float32)

    cx = rng.uniform(-0.3, 0.3, n)[:, None, None].astype(np.float32)
    cy = rng.uniform(-0.3, 0.3, n)[:, None, None].astype(np.float32)
    r = rng.uniform(0.38, 0.62, n)[:, None, None].astype(np.float32)
    jitter = np.deg2rad(rng.uniform(-15, 15, n))
    diag = np.where(rng.random(n) < 0.5, 45.0, 135.0)
    base_angle = np.select([labels == 0, labels == 1, labels == 2], [0.0, 90.0, diag], default=0.0)
    theta = (np.deg2rad(base_angle) + jitter)[:, None, None].astype(np.float32)
    freq = rng.uniform(2.2, 3.6, n)[:, None, None].astype(np.float32)  # stripe periods per radius
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None].astype(np.float32)

    dx, dy = xx - cx, yy - cy
    cos, sin = np.cos(theta), np.sin(theta)
    u = cos * dx + sin * dy  # along the pattern's axis
    v = -sin * dx + cos * dy  # across it
    rad = np.sqrt(dx * dx + dy * dy)

    mask = np.zeros((n, size, size), dtype=np.float32)
    for k in range(len(CLASS_NAMES)):
        sel = labels == k
        if not sel.any():
            continue
        uk, vk, rk, radk = u[sel], v[sel], r[sel], rad[sel]
        if k <= 2:  # stripes inside a disk; stripes run along u, vary across v
            waves = np.sin(np.pi * freq[sel] * vk / rk + phase[sel])
            m = np.clip(waves * 2.0 + 0.5, 0, 1) * _soft(radk - rk * 1.15, px)
        elif k == 3:  # grid of dots inside a disk
            cell = rk * 0.55
            du = (uk / cell + 0.5) % 1.0 - 0.5
            dv = (vk / cell + 0.5) % 1.0 - 0.5
            m = _soft(np.sqrt(du * du + dv * dv) * cell - cell * 0.28, px) * _soft(radk - rk * 1.15, px)
        elif k == 4:  # disk
            m = _soft(radk - rk * 0.8, px)
        elif k == 5:  # ring
            m = _soft(np.abs(radk - rk * 0.75) - rk * 0.17, px)
        elif k == 6:  # square (rotated by the jitter only)
            m = _soft(np.maximum(np.abs(uk), np.abs(vk)) - rk * 0.7, px)
        elif k == 7:  # cross / plus
            arm = rk * 0.22
            bar1 = np.maximum(np.abs(uk) - rk, np.abs(vk) - arm)
            bar2 = np.maximum(np.abs(vk) - rk, np.abs(uk) - arm)
            m = _soft(np.minimum(bar1, bar2), px)
        elif k == 8:  # checkerboard patch
            cell = rk * 0.5
            chk = np.sin(np.pi * uk / cell) * np.sin(np.pi * vk / cell)
            m = np.clip(chk * 3.0 + 0.5, 0, 1) * _soft(np.maximum(np.abs(uk), np.abs(vk)) - rk, px)
        else:  # triangle (pointing along -v)
            t = rk * 0.95
            d1 = vk - t * 0.55
            d2 = -0.866 * uk - 0.5 * vk - t * 0.5
            d3 = 0.866 * uk - 0.5 * vk - t * 0.5
            m = _soft(np.maximum(d1, np.maximum(d2, d3)), px)
        mask[sel] = m

    # distractor blob somewhere else
    bx = rng.uniform(-0.85, 0.85, n)[:, None, None].astype(np.float32)
    by = rng.uniform(-0.85, 0.85, n)[:, None, None].astype(np.float32)
    br = rng.uniform(0.06, 0.14, n)[:, None, None].astype(np.float32)
    blob = _soft(np.sqrt((xx - bx) ** 2 + (yy - by) ** 2) - br, px) * 0.7
    mask = np.maximum(mask, blob)

    fg, bg = _palette(groups, rng)
    contrast = np.empty(n)
    noise = np.empty(n)
    texture = np.empty(n)
    for g, style in _GROUP_STYLE.items():
        sel = groups == g
        contrast[sel] = rng.uniform(*style["contrast"], sel.sum())
        noise[sel] = style["noise"]
        texture[sel] = style["texture"]
    fg = bg + contrast[:, None] * (fg - bg)

    # background texture: a random low-frequency plaid
    tf = rng.uniform(1.5, 4.0, (n, 2))[:, :, None, None].astype(np.float32)
    tp = rng.uniform(0, 2 * np.pi, (n, 2))[:, :, None, None].astype(np.float32)
    tex = 0.5 * (np.sin(np.pi * tf[:, 0] * xx + tp[:, 0]) + np.sin(np.pi * tf[:, 1] * yy + tp[:, 1]))
    tex = tex * texture[:, None, None].astype(np.float32)

    fg32 = fg.astype(np.float32)[:, :, None, None]
    bg32 = bg.astype(np.float32)[:, :, None, None]
    m = mask[:, None]
    img = bg32 + (fg32 - bg32) * m + tex[:, None]

    blur = groups == 2
    if blur.any():
        b = img[blur]
        pad = np.pad(b, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
        img[blur] = (
            pad[:, :, :-2, 1:-1] + pad[:, :, 2:, 1:-1] + pad[:, :, 1:-1, :-2] + pad[:, :, 1:-1, 2:] + 2 * b
        ) / 6.0
    img += rng.standard_normal(img.shape, dtype=np.float32) * noise.astype(np.float32)[:, None, None, None]
    images = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return images, labels, groups

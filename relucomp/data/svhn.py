"""SVHN cropped digits: ``train_32x32.mat`` and ``test_32x32.mat`` (``X`` 32x32x3xN, ``y`` with 10 for digit 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import Column, Source
from .transforms import resize_uint8

__all__ = ["svhn_source", "read_svhn_mat"]


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images N x 3 x 32 x 32 uint8, labels int64 0..9)`` from one SVHN ``.mat`` file."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, NotImplementedError) as exc:
        raise DataError(f"cannot read {path}: {exc}", "re-download the SVHN cropped-digits .mat files") from exc
    if "X" not in mat or "y" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path} has no X / y arrays (found {keys})", "give SVHN format 2 (cropped digits) files")
    x = np.asarray(mat["X"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: X has shape {x.shape}, expected H x W x 3 x N", "give SVHN cropped digits (32x32)")
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)
    y = np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if len(y) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(y)} labels", "re-download SVHN")
    y[y == 10] = 0
    return images, y


def svhn_source(root: Path) -> Source:
    folder = root if root.is_dir() else root.parent
    train_p, test_p = folder / "train_32x32.mat", folder / "test_32x32.mat"
    if not train_p.is_file():
        raise DataError(f"no SVHN data found in {folder} (train_32x32.mat missing)", "give the folder holding train_32x32.mat and test_32x32.mat")
    parts = [("train", train_p)] + ([("test", test_p)] if test_p.is_file() else [])
    images, labels, split, ids = [], [], [], []
    for sname, p in parts:
        x, y = read_svhn_mat(p)
        images.append(x)
        labels.append(y)
        split.append(np.full(len(y), 0 if sname == "train" else 2, dtype=np.int64))
        ids.extend(f"{sname}/{i}" for i in range(len(y)))
    all_images = np.concatenate(images)
    split_a = np.concatenate(split)

    def load(idx: np.ndarray, size: int):
        return resize_uint8(all_images[idx], size), np.ones(len(idx), dtype=bool), {"cache": "none", "seconds": 0.0}

    return Source(
        name="svhn",
        columns={"label": Column(np.concatenate(labels), [str(d) for d in range(10)])},
        ids=ids,
        load_images=load,
        split=split_a if len(parts) == 2 else None,
        default_target="label",
        default_groups=None,
        info={"layout": "mat", "folder": str(folder)},
    )

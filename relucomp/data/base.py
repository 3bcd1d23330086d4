"""Core containers: :class:`GroupedDataset`, :class:`DataBundle` and the loader-facing :class:`Source`."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .transforms import normalize, random_crop_flip

__all__ = ["GroupedDataset", "DataBundle", "Column", "Source", "DataWarning"]


class DataWarning(UserWarning):
    """Something in the data was skipped or is too small to trust (never fatal)."""


def _as_long(x: Any) -> Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    return t.to(torch.int64).reshape(-1)


class GroupedDataset(Dataset):
    """Decoded images with a class label and a (fairness) group per sample.

    ``images`` is a ``uint8`` tensor ``N x 3 x H x W`` (already resized);
    ``labels`` and ``groups`` are ``int64`` tensors of length ``N``.
    ``dataset[i]`` returns ``(x, y, g)``: ``x`` float32 ``3 x H x W``
    normalised with the bundle's train mean/std, randomly cropped (pad 4) and
    flipped only when ``train`` is true; ``y`` and ``g`` int64 scalars.
    ``ids`` names every sample (relative file path or ``split/index``).
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        labels: Tensor | np.ndarray | Sequence[int],
        groups: Tensor | np.ndarray | Sequence[int],
        *,
        group_names: Sequence[str],
        class_names: Sequence[str],
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        train: bool = False,
        ids: Sequence[str] | None = None,
        padding: int = 4,
    ):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {tuple(images.shape)} {images.dtype}")
        self.images = images
        self.labels = _as_long(labels)
        self.groups = _as_long(groups)
        n = images.shape[0]
        if self.labels.numel() != n or self.groups.numel() != n:
            raise ValueError(f"{n} images but {self.labels.numel()} labels and {self.groups.numel()} groups")
        self.group_names = list(group_names)
        self.class_names = list(class_names)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.train = bool(train)
        self.padding = int(padding)
        self.ids = list(ids) if ids is not None else [str(i) for i in range(n)]
        if len(self.ids) != n:
            raise ValueError(f"{n} images but {len(self.ids)} ids")
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    # -- Dataset protocol -------------------------------------------------
    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        x = self.images[i].to(torch.float32).div_(255.0)
        if self.train:
            x = random_crop_flip(x, self.padding)
        x = (x - self._mean_t) / self._std_t
        return x, self.labels[i], self.groups[i]

    # -- helpers ----------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, idx: Sequence[int] | Tensor | np.ndarray) -> GroupedDataset:
        """A new dataset with the samples ``idx`` (same names, stats and train flag)."""
        idx_t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, Tensor) else idx)
        if idx_t.dtype == torch.bool:
            idx_t = idx_t.nonzero().reshape(-1)
        idx_t = idx_t.to(torch.int64).reshape(-1)
        return GroupedDataset(
            self.images[idx_t],
            self.labels[idx_t],
            self.groups[idx_t],
            group_names=self.group_names,
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            train=self.train,
            ids=[self.ids[int(i)] for i in idx_t],
            padding=self.padding,
        )

    def with_augmentation(self, enabled: bool = True) -> GroupedDataset:
        """A shallow copy (shares the tensors) with augmentation switched on/off."""
        new = object.__new__(GroupedDataset)
        new.__dict__.update(self.__dict__)
        new.train = bool(enabled)
        return new

    def as_tensors(self, chunk: int = 8192) -> tuple[Tensor, Tensor, Tensor]:
        """``(images float32 N x 3 x H x W normalised, labels, groups)``, never augmented."""
        out = torch.empty(self.images.shape, dtype=torch.float32)
        for s in range(0, len(self), chunk):
            x = self.images[s : s + chunk].to(torch.float32).div_(255.0)
            out[s : s + chunk] = normalize(x, self.mean, self.std)
        return out, self.labels.clone(), self.groups.clone()

    def group_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.groups, minlength=len(self.group_names)).tolist()
        return {name: int(c) for name, c in zip(self.group_names, counts)}

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=len(self.class_names)).tolist()
        return {name: int(c) for name, c in zip(self.class_names, counts)}

    def group_class_counts(self) -> dict[str, dict[str, int]]:
        k = len(self.class_names)
        flat = torch.bincount(self.groups * k + self.labels, minlength=len(self.group_names) * k)
        table = flat.view(len(self.group_names), k).tolist()
        return {
            g: {c: int(v) for c, v in zip(self.class_names, row)} for g, row in zip(self.group_names, table)
        }

    def __repr__(self) -> str:
        return (
            f"GroupedDataset(n={len(self)}, size={self.image_size}, classes={self.num_classes}, "
            f"groups={self.group_names}, train={self.train})"
        )


@dataclass
class DataBundle:
    """Train / val / test splits of one data set plus everything needed to reproduce them."""

    name: str
    train: GroupedDataset
    val: GroupedDataset
    test: GroupedDataset
    num_classes: int
    class_names: list[str]
    group_attribute: str | None
    group_names: list[str]
    target: str
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    image_size: int = 32
    seed: int = 0
    spec: str = ""
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    limit: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_groups(self) -> int:
        return len(self.group_names)

    @property
    def splits(self) -> dict[str, GroupedDataset]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def summary(self) -> dict[str, Any]:
        """Counts per split, per group and per class (JSON-serialisable)."""
        splits = {}
        for name, ds in self.splits.items():
            splits[name] = {
                "n": len(ds),
                "groups": ds.group_counts(),
                "classes": ds.class_counts(),
                "group_classes": ds.group_class_counts(),
            }
        return {
            "name": self.name,
            "spec": self.spec,
            "target": self.target,
            "group_attribute": self.group_attribute,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "group_names": list(self.group_names),
            "image_size": self.image_size,
            "seed": self.seed,
            "mean": [round(v, 6) for v in self.mean],
            "std": [round(v, 6) for v in self.std],
            "total": sum(s["n"] for s in splits.values()),
            "splits": splits,
            "info": _jsonable(self.info),
        }

    def save_splits(self, path: str | os.PathLike[str]) -> Path:
        """Write the sample ids, labels and groups of every split as JSON.

        ``path`` may be a ``.json`` file or a directory (``splits.json`` is
        written inside).  Returns the file written.
        """
        p = Path(path)
        if p.is_dir() or p.suffix.lower() != ".json":
            p = p / "splits.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": "relucomp-splits/1",
            "name": self.name,
            "spec": self.spec,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "limit": self.limit,
            "image_size": self.image_size,
            "target": self.target,
            "group_attribute": self.group_attribute,
            "class_names": list(self.class_names),
            "group_names": list(self.group_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "splits": {
                name: {"ids": list(ds.ids), "labels": ds.labels.tolist(), "groups": ds.groups.tolist()}
                for name, ds in self.splits.items()
            },
        }
        from ..atomic import atomic_write

        atomic_write(p, json.dumps(doc))
        return p

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name!r}, target={self.target!r}, groups={self.group_attribute!r}, "
            f"train={len(self.train)}, val={len(self.val)}, test={len(self.test)}, "
            f"classes={self.num_classes}, group_names={self.group_names})"
        )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


@dataclass
class Column:
    """One per-sample attribute of a source.

    Categorical: ``values`` are int codes (``-1`` = missing) into ``names``.
    Numeric: ``names`` is ``None`` and ``values`` are floats (``nan`` = missing).
    """

    values: np.ndarray
    names: list[str] | None = None

    @property
    def categorical(self) -> bool:
        return self.names is not None


# ``load_images(indices, size) -> (uint8 images len(indices) x 3 x size x size, ok mask, info)``
ImageLoader = Callable[[np.ndarray, int], "tuple[np.ndarray, np.ndarray, dict[str, Any]]"]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass
class Source:
    """What a format-specific loader hands to :func:`relucomp.data.load_data`.

    Metadata only; pixels are produced by ``load_images`` for the samples
    that survive target/group filtering and ``limit``, so a quick run with
    ``limit=500`` decodes 500 images, not the whole folder.
    """

    name: str
    columns: dict[str, Column]
    ids: list[str]
    load_images: ImageLoader
    split: np.ndarray | None = None  # int codes, see SPLIT_CODES; None = no official split
    default_target: str = "label"
    default_groups: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    presized: bool = False  # True if the source already honours ``limit`` itself (synthetic)

    def __len__(self) -> int:
        return len(self.ids)


def warn(msg: str) -> None:
    warnings.warn(msg, DataWarning, stacklevel=3)

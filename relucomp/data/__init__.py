"""Data loading for relucomp: grouped image data sets with reproducible, stratified splits.

>>> from relucomp.data import load_data
>>> bundle = load_data("synthetic")                       # default, no files needed
>>> bundle = load_data("utkface:/data/UTKFace", target="gender", fair_groups="race,gender")
>>> x, y, g = bundle.train[0]                               # normalised float image, label, group

Specs: ``synthetic``, ``utkface:PATH``, ``cifar10:PATH``, ``cifar100:PATH``,
``svhn:PATH``, ``folder:PATH`` (ImageFolder or images + CSV).
"""

from .base import Column, DataBundle, DataWarning, GroupedDataset, Source
from .cache import default_cache_dir
from .load import DATA_KINDS, detect_kind, load_data, parse_data_spec
from .synthetic import make_synthetic
from .transforms import random_crop_flip, random_crop_flip_batch

__all__ = [
    "GroupedDataset",
    "DataBundle",
    "DataWarning",
    "Column",
    "Source",
    "DATA_KINDS",
    "load_data",
    "parse_data_spec",
    "detect_kind",
    "default_cache_dir",
    "make_synthetic",
    "random_crop_flip",
    "random_crop_flip_batch",
]

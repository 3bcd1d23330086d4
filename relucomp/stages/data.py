"""Stage ``data``: load and split the data set, build the loaders and the calibration batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import RelucompError
from ..loaders import BatchLoader, first_batch, train_loader
from .base import RunState

NAME = "data"


@dataclass
class DataOut:
    bundle: Any
    num_classes: int
    train: BatchLoader      # shuffled, augmented
    train_eval: BatchLoader  # no shuffle, no augmentation (BN statistics, train accuracy)
    val: BatchLoader
    test: BatchLoader
    calib: torch.Tensor      # 32 validation images: the passes' calibration batch


def run(st: RunState) -> DataOut:
    from ..data import DataBundle, load_data

    d, seed = st.cfg.data, st.cfg.runtime.seed
    torch.manual_seed(seed)
    bundle = st.hooks.data
    if bundle is None:
        bundle = load_data(d.spec, target=d.target, fair_groups=d.fair_groups, seed=seed, limit=d.limit,
                           image_size=d.image_size, cache_dir=d.cache_dir)
    elif not isinstance(bundle, DataBundle):
        raise RelucompError(f"unsupported data object {type(bundle).__name__}",
                            "pass a data spec string (e.g. 'synthetic', 'utkface:PATH') or a relucomp.data.DataBundle")
    if st.cfg.robustness.eval:  # before any training
        from ..robustness import check_rgb_images

        check_rgb_images(bundle.test.images, "the test split")
    n_cls = d.num_classes or bundle.num_classes
    if n_cls != bundle.num_classes:
        raise RelucompError(f"--num-classes {n_cls} disagrees with the data's {bundle.num_classes} classes",
                            "drop --num-classes or pick the matching target")
    r = st.cfg.runtime
    bs, pin = r.batch_size, r.pin_memory if r.pin_memory is not None else r.device.startswith("cuda")
    return DataOut(bundle=bundle, num_classes=n_cls,
                   train=train_loader(bundle.train, batch_size=bs, seed=seed, workers=r.workers, pin_memory=pin),
                   train_eval=BatchLoader(bundle.train, batch_size=512),
                   val=BatchLoader(bundle.val, batch_size=512), test=BatchLoader(bundle.test, batch_size=512),
                   calib=first_batch(BatchLoader(bundle.val, batch_size=64), 32))

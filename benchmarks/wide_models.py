"""Wider variants of the built-in CIFAR ResNets, as ``file.py:factory`` model specs for the benchmarks.

``bench_robust.py --model benchmarks/wide_models.py:resnet8_w2`` asks whether the robust compile's clean-accuracy
cost (issue 12) shrinks with capacity (Madry et al. 2018: adversarial training needs capacity).
"""
from __future__ import annotations

from torch import nn

from relucomp.models import resnet8


def resnet8_w2(num_classes: int = 10) -> nn.Module:
    """resnet8 at twice the width (32/64/128 channels): 4x the parameters, 2x the ReLUs."""
    return resnet8(num_classes, width=2)

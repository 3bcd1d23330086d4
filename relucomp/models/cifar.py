"""CIFAR-style CNN architectures (32x32 input), written without torchvision.

Every network here is a plain :class:`torch.nn.Module` that
:func:`torch.fx.symbolic_trace` can trace.  Activations are separate,
non-inplace :class:`torch.nn.ReLU` modules so that the ReLU-budget passes can
find, count and replace each one; the head is always
``AdaptiveAvgPool2d(1) -> torch.flatten(x, 1) -> Linear``.

ReLU counts at 32x32 input (sum of C*H*W over all ReLU outputs):

* ``resnet18``: 557,056
* ``resnet8``: 73,728

Every factory has the signature ``factory(num_classes: int = 10, **kwargs)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "PreActBlock",
    "CifarResNet",
    "WideResNet",
    "TinyCNN",
    "resnet8",
    "resnet18",
    "resnet20",
    "resnet56",
    "wrn22_8",
    "tinycnn",
]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    """1x1 conv + BN projection when shape changes, identity otherwise."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_ch),
    )


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem (no maxpool), stages of BasicBlocks.

    Args:
        blocks: number of BasicBlocks per stage.
        widths: output channels per stage (before ``width`` scaling).
        stem_width: stem conv channels (before ``width`` scaling).
        num_classes: size of the linear head.
        width: multiplier applied to every channel count.
    """

    def __init__(
        self,
        blocks: list[int],
        widths: list[int],
        stem_width: int,
        num_classes: int = 10,
        width: float = 1,
    ) -> None:
        super().__init__()
        if len(blocks) != len(widths):
            raise ValueError("blocks and widths must have the same length")
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        ch = max(1, int(round(stem_width * width)))
        self.conv1 = _conv3x3(3, ch)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            out_ch = max(1, int(round(w * width)))
            layers: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(ch, out_ch, stride))
                ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class PreActBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-conv-BN-ReLU-conv, add."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet (Zagoruyko & Komodakis), depth = 6n + 4.

    Args:
        depth: network depth; ``(depth - 4) % 6 == 0``.
        widen_factor: channel multiplier ``k`` (stages are 16k, 32k, 64k).
        num_classes: size of the linear head.
        width: extra multiplier applied to every channel count.
    """

    def __init__(
        self, depth: int = 22, widen_factor: int = 8, num_classes: int = 10, width: float = 1
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n+4 (n >= 1), got {depth}")
        if width <= 0:
            raise ValueError(f"width multiplier must be > 0, got {width}")
        n = (depth - 4) // 6
        ch = max(1, int(round(16 * width)))
        self.conv1 = _conv3x3(3, ch)
        stages: list[nn.Module] = []
        for i, w in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            out_ch = max(1, int(round(w * width)))
            layers: list[nn.Module] = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(ch, out_ch, stride))
                ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.layers(x)
        x = self.relu(self.bn(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class TinyCNN(nn.Module):
    """A tiny residual CNN for fast tests (4 ReLUs, ~6k parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 8)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(8, 16, stride=2)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.block = BasicBlock(16, 16)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.block(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def _check_kwargs(factory: str, kwargs: dict[str, Any]) -> None:
    """Reject unknown keyword arguments instead of silently ignoring typos."""
    if kwargs:
        names = ", ".join(sorted(kwargs))
        raise TypeError(f"{factory}() got unexpected keyword argument(s): {names}")


def _he_resnet(n: int, num_classes: int, width: float) -> CifarResNet:
    return CifarResNet([n, n, n], [16, 32, 64], 16, num_classes=num_classes, width=width)


def resnet8(num_classes: int = 10, *, width: float = 1, **kwargs: Any) -> nn.Module:
    """He et al. CIFAR ResNet-8 (1 block per stage, widths 16/32/64)."""
    _check_kwargs("resnet8", kwargs)
    return _he_resnet(1, num_classes, width)


def resnet20(num_classes: int = 10, *, width: float = 1, **kwargs: Any) -> nn.Module:
    """He et al. CIFAR ResNet-20 (3 blocks per stage, widths 16/32/64)."""
    _check_kwargs("resnet20", kwargs)
    return _he_resnet(3, num_classes, width)


def resnet56(num_classes: int = 10, *, width: float = 1, **kwargs: Any) -> nn.Module:
    """He et al. CIFAR ResNet-56 (9 blocks per stage, widths 16/32/64)."""
    _check_kwargs("resnet56", kwargs)
    return _he_resnet(9, num_classes, width)


def resnet18(num_classes: int = 10, *, width: float = 1, **kwargs: Any) -> nn.Module:
    """CIFAR ResNet-18: 3x3 stem, no maxpool, [2,2,2,2] blocks, 64..512 channels."""
    _check_kwargs("resnet18", kwargs)
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], 64, num_classes=num_classes, width=width)


def wrn22_8(num_classes: int = 10, *, width: float = 1, **kwargs: Any) -> nn.Module:
    """Wide ResNet 22-8 (pre-activation; widths 16, 128, 256, 512)."""
    _check_kwargs("wrn22_8", kwargs)
    return WideResNet(22, 8, num_classes=num_classes, width=width)


def tinycnn(num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Tiny residual CNN for tests: 2 conv-BN-ReLU + 1 BasicBlock at 16 channels."""
    _check_kwargs("tinycnn", kwargs)
    return TinyCNN(num_classes)

"""Model zoo and model loading for relucomp.

* CIFAR-style architectures (32x32 input, fx-traceable, ``nn.ReLU`` modules):
  :func:`resnet8`, :func:`resnet18`, :func:`resnet20`, :func:`resnet56`,
  :func:`wrn22_8`, :func:`tinycnn`.
* :data:`ARCHITECTURES`, :func:`list_architectures`, :func:`build_model`: the
  built-in registry.
* :func:`load_model`: build from a name, ``file.py:factory`` or
  ``package.module:factory`` spec and optionally load a checkpoint.
"""

from relucomp.models.cifar import (
    BasicBlock,
    CifarResNet,
    PreActBlock,
    TinyCNN,
    WideResNet,
    resnet8,
    resnet18,
    resnet20,
    resnet56,
    tinycnn,
    wrn22_8,
)
from relucomp.models.loading import (
    ARCHITECTURES,
    build_model,
    list_architectures,
    load_checkpoint,
    load_model,
)

__all__ = [
    "ARCHITECTURES",
    "BasicBlock",
    "CifarResNet",
    "PreActBlock",
    "TinyCNN",
    "WideResNet",
    "build_model",
    "list_architectures",
    "load_checkpoint",
    "load_model",
    "resnet8",
    "resnet18",
    "resnet20",
    "resnet56",
    "tinycnn",
    "wrn22_8",
]

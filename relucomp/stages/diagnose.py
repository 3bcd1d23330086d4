"""Stage ``diagnose`` (--diagnose): per-group gradient norms and Hessian eigenvalues (Lanczos), dense vs compiled.

Both are diagnosed in the same form: the dense model as trained and the compiled model as its hard-gated
graph with BatchNorm separate (``LowerOut.gated``, copied before the fold), which computes what the lowered
graph computes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..loaders import BatchLoader
from ..passes.insert_gates import gates_of
from .base import RunState

NAME = "diagnose"


@dataclass
class DiagnoseOut:
    section: dict[str, Any]


def when(st: RunState) -> bool:
    return st.cfg.runtime.diagnose


def _trainable(m: nn.Module) -> nn.Module:  # a copy whose weights take gradients
    m = copy.deepcopy(m)
    for p in m.parameters():
        p.requires_grad_(True)
    for gate in gates_of(m).values():
        gate.alpha.requires_grad_(False)
    return m


def run(st: RunState) -> DiagnoseOut:
    from ..diagnostics import diagnose

    bundle = st["data"].bundle
    # same form on both sides: the dense model and the compiled model's hard-gated graph, BatchNorm unfolded
    models = (("dense", st["pretrain"].teacher), ("compiled", st["fold"].gated))
    return DiagnoseOut(section={name: diagnose(_trainable(m), BatchLoader(bundle.val, batch_size=256), bundle.num_groups,
                                               bundle.group_names) for name, m in models})

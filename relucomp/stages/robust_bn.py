"""Stages of the robust compile's dual BatchNorm (``--robust``, ``robustness.dual_bn``).

``dual_bn`` (after ``gates``): every BatchNorm2d of the gated graph becomes a
:class:`~relucomp.robust_train.DualBatchNorm2d` — clean batches use the ``clean`` branch, AugMix and
adversarial batches the ``perturbed`` one; conv weights, gates (masks) and linear replacements are shared.

``dual_bn_export`` (after the finetune, before ``fold``): one branch (``robustness.export_branch``, default
``clean``) is put back as a plain BatchNorm2d in the finetuned (and EMA) graph, so the lowering folds it into
the convs and the exported ONNX is a plain BN-free network; the clean branch's statistics are re-estimated on
clean training batches (``finetune.bn_recalibrate``).  ``model.pt`` stores the collapsed weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..passes.finetune import recalibrate_bn
from ..robust_train import collapse, dualize
from .base import RunState
from .finetune import tuned

NAME = "dual_bn"
EXPORT_NAME = "dual_bn_export"


@dataclass
class DualBNOut:
    layers: int
    branch: str = ""
    other: Any = None        # robustness.compare_branches: the gated graph with the other branch (not exported)


def when(st: RunState) -> bool:
    return st.cfg.robustness.robust and st.cfg.robustness.dual_bn


def run(st: RunState) -> DualBNOut:
    return DualBNOut(layers=dualize(st["gates"].gm))


def collapse_to(gm, branch: str, loader, *, recalibrate: bool, device: str = "cpu") -> int:
    """Put ``branch`` of every DualBatchNorm2d of ``gm`` back as a plain BatchNorm2d (in place); the clean
    branch's statistics are then re-estimated on ``loader``'s batches (``recalibrate``).  Returns how many."""
    n = collapse(gm, branch)
    if recalibrate and branch == "clean":
        recalibrate_bn(gm, loader, 20, device)
    gm.cpu().eval()
    return n


def run_export(st: RunState) -> DualBNOut:
    cfg, ft = st.cfg, tuned(st)
    branch = cfg.robustness.export_branch
    rec = bool(cfg.finetune.bn_recalibrate and cfg.finetune.epochs)
    loader, device = st["data"].train, cfg.runtime.device
    n, other = 0, None
    if cfg.robustness.compare_branches and ft.gm is not None:
        import copy

        other = copy.deepcopy(ft.gm)
        collapse_to(other, "perturbed" if branch == "clean" else "clean", loader, recalibrate=rec, device=device)
    if ft.gm is not None:
        n = collapse_to(ft.gm, branch, loader, recalibrate=rec, device=device)
    n = max(n, collapse(st["gates"].gm, branch))     # 0 when it is the finetuned graph (collapsed above)
    if ft.ema is not None:
        collapse(ft.ema, branch)
    src = ft.ema if ft.weights == "ema" and ft.ema is not None else (ft.gm or st["gates"].gm)
    ft.gated_state = {k: v.clone() for k, v in src.state_dict().items()}
    return DualBNOut(layers=n, branch=branch, other=other)

"""Stage ``gates``: trace the (pretrained) model and insert open learnable ReLU gates."""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ..pipelines import build_gated
from .base import RunState

NAME = "gates"


@dataclass
class GateOut:
    gm: fx.GraphModule   # gated graph; later stages train / binarize / prune it in place


def run(st: RunState) -> GateOut:
    cfg, calib = st.cfg, st["data"].calib
    gm, _ = build_gated(st["model"].model, calib, granularity=cfg.search.granularity,
                        leaf_modules=st["model"].leaf_modules)
    if cfg.search.replace_maxpool:  # MaxPool comparisons cost like ReLUs in PI; the finetune recovers
        from ..passes.maxpool_to_avgpool import replace_maxpool

        gm = replace_maxpool(gm, calib)
    return GateOut(gm=gm)

"""Stage ``fold``: lower the gates (identity / ReLU / sparse / PI layout), fold BN, compose affine ops, DCE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..errors import InternalError
from ..infra import PassManager
from ..passes.shape_prop import layer_table
from ..pipelines import lowering_passes, summary
from .base import RunState
from .finetune import tuned

NAME = "fold"


@dataclass
class LowerOut:
    gm: fx.GraphModule
    ema: fx.GraphModule | None
    rows: list[dict[str, Any]]
    after: dict[str, int]
    records: list[dict[str, Any]] = field(default_factory=list)


def run(st: RunState) -> LowerOut:
    calib, form = st["data"].calib, st.cfg.export.gate_form
    pm = PassManager(lowering_passes(calib, gate_form=form), calibration=calib)
    ft = tuned(st)
    gm = pm.run(ft.gm if ft.gm is not None else st["gates"].gm).gm
    ema = ft.ema
    if ema is not None:
        ema = PassManager(lowering_passes(calib, gate_form=form), calibration=calib).run(ema.eval()).gm
    after = summary(gm)
    if after["relus_kept"] > st["model"].budget:
        raise InternalError(f"compiled model keeps {after['relus_kept']} ReLUs > budget {st['model'].budget}")
    return LowerOut(gm=gm, ema=ema, rows=layer_table(gm), after=after, records=[r.to_dict() for r in pm.records])

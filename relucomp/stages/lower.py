"""Stage ``fold``: lower the gates (identity / ReLU / sparse / PI layout), fold BN, compose affine ops, DCE."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from ..errors import InternalError
from ..infra import PassManager
from ..ir import copy_gm
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
    gated: fx.GraphModule | None = None   # with --diagnose: the hard-gated graph before lowering (BN unfolded)


def run(st: RunState) -> LowerOut:
    calib, form = st["data"].calib, st.cfg.export.gate_form
    # diagnostics compare like with like: a copy of the hard-gated graph (BN separate, as in the dense model),
    # which computes exactly what the lowered one does
    # (under DP the finetuned graph is the DP-compatible one: BatchNorm already folded by relucomp.dp)
    ft = tuned(st)
    src = ft.gm if ft.gm is not None else st["gates"].gm
    gated = copy_gm(src) if st.cfg.runtime.diagnose else None
    pm = PassManager(lowering_passes(calib, gate_form=form), calibration=calib)
    gm = pm.run(src).gm
    ema = ft.ema
    if ema is not None:
        ema = PassManager(lowering_passes(calib, gate_form=form), calibration=calib).run(ema.eval()).gm
    after, budget = summary(gm), st["model"].budget
    # gated ReLUs kept + every comparison no gate controls (``comparisons`` includes the hidden ReLUs)
    total = after["relus_kept"] - after["hidden_relus"] + after["comparisons"] + (
        after["maxpool_comparisons"] if st.cfg.search.budget_includes_maxpool else 0)
    if total > budget:
        raise InternalError(f"compiled model evaluates {total} comparisons per image ({after['relus_kept']} ReLUs) "
                            f"> budget {budget}")
    return LowerOut(gm=gm, ema=ema, rows=layer_table(gm), after=after, records=[r.to_dict() for r in pm.records],
                    gated=gated)

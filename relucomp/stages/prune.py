"""Stage ``prune`` (with --prune-channels / --mac-budget / --sparsity): channel pruning and GMP setup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import RunState

NAME = "prune"


@dataclass
class PruneOut:
    report: dict[str, Any] | None = None   # the report's ``pruning`` section
    gmp: Any = None                        # gradual magnitude pruning, stepped during the finetune
    plan: Any = None                       # the channel plan (rebuilds the pruned graph on load / resume)


def when(st: RunState) -> bool:
    p = st.cfg.pruning
    return p.prune_channels is not None or p.mac_budget is not None or p.sparsity is not None


def run(st: RunState) -> PruneOut:
    from ..pruning import compile_hook, pruning_plan_of

    p, resumed = st.cfg.pruning, st.resuming("finetune")
    report, gmp = compile_hook(
        st["gates"].gm, prune_channels=p.prune_channels, mac_budget=p.mac_budget, sparsity=p.sparsity,
        importance=p.importance, calib=st["data"].train, relu_budget=st["model"].gate_budget,
        finetune_steps=max(0, st.cfg.finetune.epochs) * len(st["data"].train), log=st.say,
        resume_plan=resumed.get("pruning_plan") if resumed is not None else None)
    return PruneOut(report=report, gmp=gmp, plan=pruning_plan_of(report) if report is not None else None)

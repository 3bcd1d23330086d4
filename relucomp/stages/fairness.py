"""Stage ``fairness``: per-group Δ_g / ψ_g / Ψ_PW on train / val / test for the last and EMA weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..fair_compile import fairness_section
from .base import RunState
from .finetune import tuned as finetuned

NAME = "fairness"


@dataclass
class FairnessOut:
    section: dict[str, Any]    # the report's ``fairness`` section


def run(st: RunState) -> FairnessOut:
    cfg, bundle, dense, tuned = st.cfg, st["data"].bundle, st["evaluate_dense"], finetuned(st)
    low = st["fold"]
    variants = {"last": low.gm, **({"ema": low.ema} if low.ema is not None else {})}
    preds = {"train": dense.train, "val": dense.val, "test": dense.test}  # dense predictions: computed once
    results = fairness_section(preds, variants, bundle, seed=cfg.runtime.seed)
    return FairnessOut(section={
        "method": cfg.fair_method, "phase": cfg.fairness.phase, "tolerance": cfg.fairness.tolerance,
        "groups": bundle.group_names, "group_attribute": bundle.group_attribute,
        "dense_train_group_acc": dense.train_group_acc, "dense_train_acc": dense.train_acc,
        "multiplier_trajectory": tuned.fair.trajectory if tuned.fair is not None else [],
        "search_multiplier_trajectory": st["search"].stats.get("fair_trajectory", []),
        "results": results})

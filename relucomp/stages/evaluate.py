"""Stage ``evaluate_compiled``: accuracy of the compiled model, overall and per group (the one evaluator)."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluate import Predictions, predict
from .base import RunState

NAME = "evaluate_compiled"


@dataclass
class EvalOut:
    val: Predictions
    test: Predictions
    test_group_acc: dict[str, float | None]


def run(st: RunState) -> EvalOut:
    data, gm = st["data"], st["fold"].gm
    test = predict(gm, data.test)
    return EvalOut(val=predict(gm, data.val), test=test, test_group_acc=test.group_acc_by_name(data.bundle.group_names))

"""Stage ``evaluate_dense``: the dense (teacher) model's predictions, once, on every split."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

from ..errors import DataError
from ..evaluate import Predictions, predict, predict_split
from ..fair_compile import group_accuracy_like_replay
from .base import RunState

NAME = "evaluate_dense"


@dataclass
class DenseOut:
    """The dense model's predictions.  ``val`` / ``test`` are computed by the stage; the train-split
    quantities only the fairness work reads (the report's train split, CEAG's references) are computed on
    first use, once — a run without fairness groups never pays for them."""

    val: Predictions
    test: Predictions
    test_group_acc: dict[str, float | None]
    _train_fn: Callable[[], Predictions] = field(repr=False, default=None)
    _replay_fn: Callable[[], tuple] = field(repr=False, default=None)

    @cached_property
    def train(self) -> Predictions:
        """Clean train images (eval mode): the fairness report's train split."""
        return self._train_fn()

    @cached_property
    def _replay(self) -> tuple:
        return self._replay_fn()

    @property
    def train_group_acc(self) -> list[float | None]:
        """The CEAG reference d_g, measured like the replay buffers."""
        return self._replay[0]

    @property
    def train_acc(self) -> float:
        """The CEAG reference d (train mode, augmented batches)."""
        return self._replay[1]


def check_groups(bundle, *, min_train: int = 1) -> None:
    """Refuse empty groups in the training split (a constraint on nothing)."""
    counts = bundle.train.group_counts()
    empty = [g for g, n in counts.items() if n < min_train]
    if empty:
        raise DataError(f"group(s) {', '.join(empty)} have no training samples",
                        "choose another --fair-groups attribute, merge small groups, or drop --limit")


def run(st: RunState) -> DenseOut:
    data, teacher = st["data"], st["pretrain"].teacher
    bundle = data.bundle
    if st.cfg.fair_method != "nft":
        check_groups(bundle)
    test = predict(teacher, data.test)
    bs, seed = st.cfg.runtime.batch_size, st.cfg.runtime.seed
    return DenseOut(val=predict(teacher, data.val), test=test,
                    test_group_acc=test.group_acc_by_name(bundle.group_names),
                    _train_fn=lambda: predict_split(teacher, bundle.train),
                    # the reference CEAG's replay buffers are compared with, measured as they are (train mode)
                    _replay_fn=lambda: group_accuracy_like_replay(teacher, bundle.train, batch_size=bs, seed=seed))

"""Stage ``evaluate_dense``: the dense (teacher) model's predictions, once, on every split."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from ..evaluate import Predictions, predict, predict_split
from ..fair_compile import group_accuracy_like_replay
from .base import RunState

NAME = "evaluate_dense"


@dataclass
class DenseOut:
    val: Predictions
    test: Predictions
    train: Predictions                 # clean train images (eval mode): the fairness report's train split
    train_group_acc: list[float | None]  # the CEAG reference d_g, measured like the replay buffers
    train_acc: float                   # the CEAG reference d (train mode, augmented batches)
    test_group_acc: dict[str, float | None]


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
    train = predict_split(teacher, bundle.train)
    # the reference CEAG's replay buffers are compared with, measured as they are (train mode, augmented)
    ref_groups, ref_acc = group_accuracy_like_replay(teacher, bundle.train, batch_size=st.cfg.runtime.batch_size,
                                                     seed=st.cfg.runtime.seed)
    return DenseOut(val=predict(teacher, data.val), test=test, train=train,
                    train_group_acc=ref_groups, train_acc=ref_acc,
                    test_group_acc=test.group_acc_by_name(bundle.group_names))

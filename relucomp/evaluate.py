"""The one evaluator: predictions once, then overall and per-group accuracy from them.

:func:`predict` runs a model in eval mode over a loader of ``(x, y[, g])``
batches and keeps labels, predictions, groups and the summed cross-entropy;
:class:`Predictions` answers overall accuracy, loss and accuracy per group
(per group by fairlearn's ``MetricFrame``, via :func:`relucomp.metrics.group_accuracy`).
The dense model's predictions are computed once per split and reused by the
accuracy table, the CEAG reference accuracies and the fairness report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Predictions", "predict", "predict_split"]


@dataclass
class Predictions:
    y: torch.Tensor
    pred: torch.Tensor
    g: torch.Tensor | None
    loss_sum: float
    _group_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return int(self.y.numel())

    @property
    def acc(self) -> float:
        """Top-1 accuracy in points."""
        return 100.0 * float((self.pred == self.y).float().mean()) if self.n else 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1)

    def summary(self) -> dict[str, float]:
        return {"acc": self.acc, "loss": self.loss, "n": self.n}

    def group_acc(self, num_groups: int) -> list[float | None]:
        """Accuracy (points) per group index, by fairlearn's ``MetricFrame``
        (:func:`relucomp.metrics.group_accuracy`); ``None`` for an empty group.
        Computed once per ``num_groups`` from the stored predictions."""
        key = int(num_groups)
        if key not in self._group_cache:
            from .metrics import group_accuracy

            tab = group_accuracy(self.y, self.pred, self.g, [str(i) for i in range(key)], n_boot=None,
                                 include_overall=False)
            self._group_cache[key] = [float(a) if int(c) > 0 else None
                                      for c, a in zip(tab["count"].to_numpy(), tab["accuracy"].to_numpy())]
        return list(self._group_cache[key])

    def group_acc_by_name(self, names: Sequence[str]) -> dict[str, float | None]:
        return dict(zip(names, self.group_acc(len(names))))


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu") -> Predictions:
    was = model.training
    model.eval()
    ys, ps, gs = [], [], []
    loss = 0.0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        ys.append(y.cpu())
        ps.append(logits.argmax(1).cpu())
        if len(batch) > 2:
            gs.append(batch[2].cpu())
    model.train(was)
    cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))  # noqa: E731
    return Predictions(cat(ys), cat(ps), cat(gs) if gs else None, loss)


def predict_split(model: nn.Module, ds, device: str | torch.device = "cpu", batch_size: int = 512) -> Predictions:
    from .loaders import BatchLoader

    return predict(model, BatchLoader(ds, batch_size=batch_size), device)

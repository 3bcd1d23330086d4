"""The fairness training path of compile (the only one), and the fairness evaluation.

* :class:`FairPhase` wires a :class:`~relucomp.fairness.FairConstraintTerm`
  (cooper multipliers, replay buffers) into a training pass as its
  ``extra_loss`` / ``after_step`` hooks, keeps an EMA of the weights
  (:class:`torch.optim.swa_utils.AveragedModel`) and records multiplier
  trajectories.
* :func:`group_accuracy_like_replay` — the dense CEAG reference, measured the
  way the replay buffers measure the model in training (train mode, augmented).
* :func:`ema_model` — the EMA weights in a copy of the graph with BatchNorm
  statistics recomputed by ``update_bn`` (not averaged).
* :func:`fairness_section` evaluates the dense and compiled models (last and
  EMA weights) per group on train / val / test with
  :func:`relucomp.metrics.fairness_report`, reusing the dense predictions.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import fx, nn

from .fairness import FairConstraintTerm
from .ir import copy_gm
from .loaders import BatchLoader
from .metrics import fairness_report

FAIR_METHODS = ("ceag", "el", "nft")
FAIR_PHASES = ("finetune", "search", "both")


@torch.no_grad()
def group_accuracy_like_replay(model: nn.Module, ds, *, batch_size: int = 128, seed: int = 0,
                               epochs: int = 1) -> tuple[list[float | None], float]:
    """Per-group and overall accuracy (points) measured the way the replay buffers measure it.

    CEAG's replay buffers hold the *training* model's correctness on the
    training batches: train mode (BatchNorm on batch statistics, dropout on)
    and augmented images (random crop + flip), at the training batch size.  The
    dense reference ``d_g`` of ψ_g = (d_g − a_g) − (d − a) must be measured
    the same way, or ψ_g carries the eval-vs-train gap of the measurement
    rather than the damage of compression.  ``model`` is left untouched (a
    copy runs in train mode, so its BatchNorm running statistics never move).
    """
    m = copy.deepcopy(model).train()
    G = len(ds.group_names)
    correct = torch.zeros(G)
    count = torch.zeros(G)
    loader = BatchLoader(ds, batch_size=batch_size, shuffle=True, augment=True, seed=seed + 7919)
    for _ in range(max(1, int(epochs))):
        for x, y, g in loader:
            if x.shape[0] < 2:  # a batch of one has no batch statistics
                continue
            ok = (m(x).argmax(1) == y).float()
            correct.index_add_(0, g, ok)
            count.index_add_(0, g, torch.ones_like(ok))
    per = [100.0 * float(c / n) if n > 0 else None for c, n in zip(correct, count)]
    overall = 100.0 * float(correct.sum() / count.sum().clamp_min(1))
    return per, overall


class FairPhase:
    """Constraint term + EMA + trajectory recording for one training phase."""

    def __init__(self, *, method: str, num_groups: int, dense_group_acc, dense_acc: float, tolerance: float,
                 dual_lr: float = 0.05, replay_size: int = 40, ema_model: nn.Module | None = None,
                 ema_decay: float = 0.99, ema_warmup: bool = False, record_every: int = 10):
        self.method = method
        self.term = FairConstraintTerm(num_groups, method=method, dense_group_acc=dense_group_acc,
                                       dense_acc=dense_acc, tolerance=tolerance, dual_lr=dual_lr,
                                       replay_size=replay_size)
        self.ema = None
        if ema_model is not None:
            from .train import averaged

            self.ema = averaged(ema_model, decay=ema_decay, warmup=ema_warmup)
        self.model = ema_model
        self.record_every = record_every
        self.trajectory: list[dict[str, Any]] = []

    def extra_loss(self, logits, y, g):
        if g is None:
            return torch.zeros((), dtype=logits.dtype)
        from . import distributed

        if not distributed.active():
            return self.term.loss(logits, y, g)
        # multi-process: the replay buffers see the whole global batch, in the single-process order (ranks hold
        # contiguous slices), so every rank holds the same per-group statistics and ψ estimates
        t = self.term
        if logits.device != t.device:
            t.to(logits.device)
        y, g = y.reshape(-1).to(logits.device), g.reshape(-1).to(logits.device)
        ok = (logits.detach().argmax(1) == y).to(torch.uint8)
        g_all = distributed.all_gather_cat(g)
        t.observe_correct(distributed.all_gather_cat(ok).bool(), g_all)
        # primal: this rank's slice (DDP averages the gradients); dual: the global batch's groups and per-group
        # losses (gathered, detached), so the dual step is the single-process one on every rank
        term = t.lagrangian_term(t.constraint_state(logits, y, g, update_replay=False))
        loss_all = distributed.all_gather_cat(torch.nn.functional.cross_entropy(logits.detach().float(), y,
                                                                                reduction="none"))
        t._state = t.constraint_state(logits, distributed.all_gather_cat(y), g_all, per_sample_loss=loss_all,
                                      update_replay=False)
        return torch.zeros((), device=logits.device, dtype=logits.dtype) if term is None else term

    def after_step(self, step: int) -> None:
        from . import distributed

        self.term.dual_step()
        if distributed.active() and self.term.multiplier is not None:  # every rank takes rank 0's dual step
            with torch.no_grad():
                distributed.broadcast_(self.term.multiplier.weight.data)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        if step == 1 or step % self.record_every == 0:
            self.trajectory.append({"step": step, "multipliers": self.term.multiplier_values(),
                                    "psi_replay": self.term.psi_estimate()})

    def state_dict(self) -> dict[str, Any]:
        return {"term": self.term.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "trajectory": self.trajectory}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.term.load_state_dict(state["term"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.trajectory = list(state.get("trajectory", []))


def fairness_section(dense_preds: dict[str, Any], compiled: dict[str, nn.Module], bundle, *, n_boot: int = 200,
                     seed: int = 0, known: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{weights: {split: fairness_report}}`` for each compiled variant (e.g. last, ema).

    ``dense_preds``: ``{split: Predictions}`` of the dense model (computed once by the dense stage);
    ``known``: ``{weights: {split: Predictions}}`` of the compiled variants already computed (not redone).
    Bootstrap intervals (``n_boot``) only for the test split, where they are reported.
    """
    from .evaluate import predict_split

    out: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, model in compiled.items():
            out[name] = {}
            for s, dp in dense_preds.items():
                have = (known or {}).get(name, {}).get(s)
                pc = have.pred if have is not None else predict_split(model, bundle.splits[s]).pred
                out[name][s] = fairness_report(dp.y.numpy(), dp.pred.numpy(), pc.numpy(), dp.g.numpy(),
                                               bundle.group_names, n_boot=n_boot if s == "test" else 0, seed=seed)
    return out


def ema_model(gm: nn.Module, phase: FairPhase | None, bn_loader) -> nn.Module | None:
    """A copy of ``gm`` with the EMA weights and BatchNorm statistics recomputed on ``bn_loader``."""
    if phase is None or phase.ema is None:
        return None
    from torch.optim.swa_utils import update_bn

    m = copy_gm(gm) if isinstance(gm, fx.GraphModule) else copy.deepcopy(gm)
    with torch.no_grad():
        for p, q in zip(m.parameters(), phase.ema.module.parameters()):
            p.copy_(q)
    update_bn(bn_loader, m)
    return m.eval()

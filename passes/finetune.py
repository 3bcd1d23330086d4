"""FinetunePass: train the weights with the ReLU masks fixed (CE + KD).

Used after the mask search (SNL finetune phase, DeepReDuce-style baselines)
and by the fairness pass (which supplies ``extra_loss``/``after_step`` for
its constraints).  Gate values are frozen; weights and the gates' linear
replacements (``rep_scale``/``rep_shift``, no weight decay) train.

Recipe (defaults in :data:`relucomp.recipe.FINETUNE_DEFAULTS`):

* loss ``(1 − kd_weight)·CE + kd_weight·T²·KL(teacher/T ‖ student/T)``;
* LR per step: linear warm-up over ``warmup_epochs`` then cosine decay to 0
  (``lr_schedule="cosine"``), or ``"constant"``;
* ``bn_recalibrate``: once the weights stop changing, BatchNorm running
  statistics are re-estimated (cumulative average over ``recalibrate_batches``
  train batches, no gradient) — the masks changed the activation statistics
  and the running averages lag behind them.

The checkpoint holds the whole state (model, optimizer moments, the schedule
position down to the batch, the loader's and torch's RNG streams), so a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.nn import ReLUGate
from relucomp.train import LoopState, ce_kd_step, train_loop


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable, batches: int = 20, device: str = "cpu") -> int:
    """Re-estimate BatchNorm running statistics on ``batches`` batches (cumulative average); returns #BN."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        model(batch[0].to(device))
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
        m.train(tr)
    model.train(was)
    return len(bns)


class FinetunePass(Pass):
    preserves_semantics = False

    def __init__(
        self,
        *,
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        epochs: int = 3,
        lr: float = 0.005,
        kd_weight: float = 0.7,
        temperature: float = 4.0,
        lr_schedule: str = "cosine",
        warmup_epochs: float = 0.5,
        bn_recalibrate: bool = True,
        recalibrate_batches: int = 20,
        extra_loss: Callable | None = None,
        after_step: Callable[[int], None] | None = None,
        on_epoch_end: Callable | None = None,
        progress: Any | None = None,
        checkpoint: Callable[[dict], None] | None = None,
        resume: dict | None = None,
        phase: str = "finetune",
        device: str = "cpu",
        loss_step: Callable | None = None,
        clip_grad_norm: float | None = None,
    ):
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError("lr_schedule must be 'cosine' or 'constant'")
        if warmup_epochs < 0 or not 0 <= kd_weight <= 1 or temperature <= 0:
            raise ValueError("warmup_epochs ≥ 0, kd_weight in [0, 1], temperature > 0 required")
        self.loader = train_loader
        self.teacher = teacher
        self.epochs = epochs
        self.lr = lr
        self.kd_weight, self.temperature = kd_weight, temperature
        self.lr_schedule, self.warmup_epochs = lr_schedule, warmup_epochs
        self.bn_recalibrate, self.recalibrate_batches = bn_recalibrate, recalibrate_batches
        self.extra_loss, self.after_step, self.on_epoch_end = extra_loss, after_step, on_epoch_end
        self.progress = progress
        self.checkpoint = checkpoint
        self.resume = resume
        self.phase = phase
        self.device = device
        self.loss_step = loss_step   # a train_loop StepFn replacing CE + KD (the robust compile's objective)
        self.clip_grad_norm = clip_grad_norm  # gradient norm cap (None: off)

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.epochs <= 0:
            return PassResult(gm, False, {"epochs": 0})
        rep_ids = set()
        for m in gm.modules():
            if isinstance(m, ReLUGate):
                m.alpha.requires_grad_(False)
                if m.replacement == "affine":
                    rep_ids |= {id(m.rep_scale), id(m.rep_shift)}
        params = [p for p in gm.parameters() if p.requires_grad and id(p) not in rep_ids]
        groups = [{"params": params, "weight_decay": 5e-4}]
        reps = [p for p in gm.parameters() if id(p) in rep_ids and p.requires_grad]
        if reps:
            groups.append({"params": reps, "weight_decay": 0.0})
        opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9, nesterov=True)
        n_batches = max(1, len(self.loader))
        total = self.epochs * n_batches
        warm = int(round(self.warmup_epochs * n_batches)) if self.lr_schedule == "cosine" else 0

        def factor(step: int) -> float:
            if self.lr_schedule == "constant":
                return 1.0
            if step < warm:
                return (step + 1) / (warm + 1)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        loop = LoopState()
        if self.resume:
            gm.load_state_dict(self.resume["model"])
            opt.load_state_dict(self.resume["optimizer"])
            sched.load_state_dict(self.resume["scheduler"])
            loop = LoopState(self.resume.get("loop") or {"epoch": int(self.resume["epoch"])})

        def save(next_epoch: int, interrupted: bool):
            if self.checkpoint is not None:
                self.checkpoint({"phase": self.phase, "epoch": next_epoch, "model": gm.state_dict(),
                                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                 "loop": loop.to_dict()})

        def after(step: int):
            sched.step()
            if self.after_step is not None:
                self.after_step(step)

        gm.to(self.device)
        step = self.loss_step or ce_kd_step(self.teacher, kd_weight=self.kd_weight, temperature=self.temperature, extra=self.extra_loss)
        history = train_loop(gm, self.loader, epochs=self.epochs, optimizer=opt, step_fn=step,
                             desc=self.phase, progress=self.progress, after_step=after,
                             on_epoch_end=self.on_epoch_end, save=save, device=self.device, loop_state=loop,
                             clip_grad_norm=self.clip_grad_norm)
        n_bn = recalibrate_bn(gm, self.loader, self.recalibrate_batches, self.device) if self.bn_recalibrate else 0
        return PassResult(gm, True, {"epochs": self.epochs, "history": history, "kd_weight": self.kd_weight,
                                     "temperature": self.temperature, "lr": self.lr, "lr_schedule": self.lr_schedule,
                                     "bn_recalibrated": n_bn})

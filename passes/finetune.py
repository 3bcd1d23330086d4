"""FinetunePass: train the weights with the ReLU masks fixed (CE + KD).

Used after the mask search (SNL finetune phase, DeepReDuce-style baselines)
and by the fairness pass (which supplies ``extra_loss``/``after_step`` for
its constraints).  Gate values are frozen; only weights train.  Cosine LR.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.nn import ReLUGate
from relucomp.train import ce_kd_step, train_loop


class FinetunePass(Pass):
    preserves_semantics = False

    def __init__(
        self,
        *,
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        epochs: int = 3,
        lr: float = 0.005,
        kd_weight: float = 0.5,
        temperature: float = 4.0,
        extra_loss: Callable | None = None,
        after_step: Callable[[int], None] | None = None,
        on_epoch_end: Callable | None = None,
        progress: Any | None = None,
        checkpoint: Callable[[dict], None] | None = None,
        resume: dict | None = None,
        phase: str = "finetune",
        device: str = "cpu",
    ):
        self.loader = train_loader
        self.teacher = teacher
        self.epochs = epochs
        self.lr = lr
        self.kd_weight, self.temperature = kd_weight, temperature
        self.extra_loss, self.after_step, self.on_epoch_end = extra_loss, after_step, on_epoch_end
        self.progress = progress
        self.checkpoint = checkpoint
        self.resume = resume
        self.phase = phase
        self.device = device

    def call(self, gm: fx.GraphModule) -> PassResult:
        if self.epochs <= 0:
            return PassResult(gm, False, {"epochs": 0})
        for m in gm.modules():
            if isinstance(m, ReLUGate):
                m.alpha.requires_grad_(False)
        params = [p for p in gm.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs)
        start = 0
        if self.resume:
            gm.load_state_dict(self.resume["model"])
            opt.load_state_dict(self.resume["optimizer"])
            sched.load_state_dict(self.resume["scheduler"])
            start = int(self.resume["epoch"])

        def save(next_epoch: int, interrupted: bool):
            if self.checkpoint is not None:
                self.checkpoint({"phase": self.phase, "epoch": next_epoch, "model": gm.state_dict(),
                                 "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

        gm.to(self.device)
        step = ce_kd_step(self.teacher, kd_weight=self.kd_weight, temperature=self.temperature, extra=self.extra_loss)
        history = train_loop(gm, self.loader, epochs=self.epochs, optimizer=opt, step_fn=step, scheduler=sched,
                             start_epoch=start, desc=self.phase, progress=self.progress, after_step=self.after_step,
                             on_epoch_end=self.on_epoch_end, save=save, device=self.device)
        return PassResult(gm, True, {"epochs": self.epochs, "history": history})

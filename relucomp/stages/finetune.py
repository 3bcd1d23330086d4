"""Stage ``finetune``: train the weights with the masks fixed (KD from the dense model, fairness term, GMP).

Keeps an exponential moving average of the weights
(:class:`torch.optim.swa_utils.AveragedModel`); its BatchNorm statistics are
recomputed on the clean training images (``update_bn``), not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..fair_compile import FairPhase, ema_model
from ..infra import PassManager
from ..passes.finetune import FinetunePass
from .base import RunState
from .prune import PruneOut
from .search import fair_phase

NAME = "finetune"


@dataclass
class FinetuneOut:
    stats: dict[str, Any] = field(default_factory=dict)
    fair: FairPhase | None = None
    gated_state: dict[str, torch.Tensor] = field(default_factory=dict)   # what model.pt stores
    ema: fx.GraphModule | None = None                                      # EMA weights, BN re-estimated


def run(st: RunState) -> FinetuneOut:
    from ..pruning import chain_steps

    cfg, gm = st.cfg, st["gates"].gm
    prune: PruneOut = st.results.get("prune") or PruneOut()
    resumed = st.resuming(NAME)
    ffair = fair_phase(st, NAME, ema_model=gm if cfg.finetune.ema and cfg.finetune.epochs > 0 else None)
    if resumed is not None and resumed.get("fair") is not None:
        ffair.load_state_dict(resumed["fair"])
    light = st["search"].light

    def save(s):
        s.update(search_stats=light, pruning_plan=prune.plan, fair=ffair.state_dict())
        st.ckpt.save(s)

    def epoch_end(epoch, rec):
        return {"multipliers": ffair.term.multiplier_values(), "psi_replay": ffair.term.psi_estimate()}

    after = chain_steps(prune.gmp, ffair.after_step) if prune.gmp is not None else ffair.after_step
    fp = FinetunePass(train_loader=st["data"].train, teacher=st["pretrain"].teacher, epochs=cfg.finetune.epochs,
                      lr=cfg.finetune.lr if cfg.finetune.lr is not None else cfg.search.lr * 0.5,
                      kd_weight=cfg.search.kd_weight, temperature=cfg.search.kd_temperature, progress=st.progress,
                      checkpoint=save if st.out is not None else None, extra_loss=ffair.extra_loss,
                      on_epoch_end=epoch_end, after_step=after, resume=resumed, device=cfg.runtime.device)
    stats = PassManager([fp]).run(gm).stats["passes"][0]["stats"]
    gm.cpu().eval()
    if prune.gmp is not None:  # GMP: reach the final sparsity and bake the masks into the weights
        prune.report["sparsity"] = prune.gmp.bake()
    gated_state = {k: v.clone() for k, v in gm.state_dict().items()}
    ema = ema_model(gm, ffair, st["data"].train_eval) if cfg.finetune.epochs > 0 else None
    if prune.gmp is not None and ema is not None:
        prune.gmp.apply_to(ema)
    return FinetuneOut(stats=stats, fair=ffair, gated_state=gated_state, ema=ema)

"""Stage ``finetune``: train the weights with the masks fixed (KD from the dense model, fairness term, GMP).

The recipe (:mod:`relucomp.recipe`): ``(1 − w)·CE + w·KD`` with ``finetune.kd_weight`` and
``finetune.temperature`` (default: the search's), LR warm-up then cosine, the gates' linear replacements
trained too, and BatchNorm statistics re-estimated at the end (``finetune.bn_recalibrate``).  The
checkpoint holds the pass's whole state (its ``loop`` entry: the batch, the RNG streams) so ``--resume``
repeats the uninterrupted run.

Keeps an exponential moving average of the weights
(:class:`torch.optim.swa_utils.AveragedModel`); its BatchNorm statistics are
recomputed on the clean training images (``update_bn``), not averaged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..compile_report import DPReport
from ..fair_compile import FairPhase, ema_model
from ..infra import PassManager
from ..passes.finetune import FinetunePass
from ..recipe import finetune_lr
from .base import RunState
from .prune import PruneOut
from .search import fair_phase, robust_step

NAME = "finetune"


@dataclass
class FinetuneOut:
    stats: dict[str, Any] = field(default_factory=dict)
    fair: FairPhase | None = None
    gated_state: dict[str, torch.Tensor] = field(default_factory=dict)   # what model.pt stores (``weights``)
    ema: fx.GraphModule | None = None                                      # EMA weights, BN re-estimated
    gm: fx.GraphModule | None = None                                       # the finetuned gated model (last)
    dp: DPReport | None = None                                             # set by the dp_finetune stage
    weights: str = "last"                                                  # exported: last | ema


def output(st: RunState, gm: fx.GraphModule, ema: fx.GraphModule | None, **kw: Any) -> FinetuneOut:
    """A finetune stage's output; ``gated_state`` holds the exported weights (``export.weights``, if an EMA exists)."""
    weights = st.cfg.export_weights if ema is not None else "last"
    src = ema if weights == "ema" else gm
    return FinetuneOut(gated_state={k: v.clone() for k, v in src.state_dict().items()}, ema=ema, gm=gm,
                       weights=weights, **kw)


def when(st: RunState) -> bool:
    # under DP the dp_finetune stage runs instead (with --dp-phase search only the search is private)
    return st.cfg.dp.epsilon is None or st.cfg.dp.phase == "search"


def tuned(st: RunState) -> FinetuneOut:
    """The finetune's output: this stage's, or the ``dp_finetune`` stage's when that ran instead."""
    return st.results[NAME] if NAME in st.results else st["dp_finetune"]


def run(st: RunState) -> FinetuneOut:
    from ..pruning import chain_steps

    cfg, gm = st.cfg, st["gates"].gm
    prune: PruneOut = st.results.get("prune") or PruneOut()
    resumed = st.resuming(NAME)
    # EMA weights: a fairness variant, or the exported weights (export.weights = ema)
    keep_ema = cfg.finetune.ema and cfg.finetune.epochs > 0 and (cfg.wants_fairness or cfg.export_weights == "ema")
    ffair = fair_phase(st, NAME, ema_model=gm if keep_ema else None)
    if resumed is not None and resumed.get("fair") is not None:
        ffair.load_state_dict(resumed["fair"])
    light = st["search"].light

    dplan = st["search"].dp_plan

    def save(s):
        s.update(search_stats=light, pruning_plan=prune.plan, fair=ffair.state_dict())
        if dplan is not None:  # --dp-phase search: a resume rebuilds the DP-converted model and the accountant
            from ..dp import plan_state

            s.update(plan=plan_state(dplan), accountant=[list(h) for h in dplan.accountant.history])
        st.ckpt.save(s)

    def epoch_end(epoch, rec):
        return {"multipliers": ffair.term.multiplier_values(), "psi_replay": ffair.term.psi_estimate()}

    after = chain_steps(prune.gmp, ffair.after_step) if prune.gmp is not None else ffair.after_step
    fp = FinetunePass(train_loader=st["data"].train, teacher=st["pretrain"].teacher, epochs=cfg.finetune.epochs,
                      lr=cfg.finetune.lr if cfg.finetune.lr is not None else finetune_lr(cfg.runtime.batch_size),
                      kd_weight=cfg.finetune.kd_weight,
                      # dual BN: the exported branch is recalibrated once collapsed (stage dual_bn_export)
                      bn_recalibrate=cfg.finetune.bn_recalibrate and not (cfg.robustness.robust and cfg.robustness.dual_bn),
                      temperature=cfg.finetune.temperature or cfg.search.kd_temperature, progress=st.progress,
                      checkpoint=save if st.out is not None else None, extra_loss=ffair.extra_loss,
                      on_epoch_end=epoch_end, after_step=after, resume=resumed, device=cfg.runtime.device,
                      clip_grad_norm=cfg.finetune.clip_grad_norm,
                      loss_step=robust_step(st, cfg.finetune.kd_weight,
                                            cfg.finetune.temperature or cfg.search.kd_temperature, ffair, NAME))
    stats = PassManager([fp]).run(gm).stats["passes"][0]["stats"]
    gm.cpu().eval()
    if prune.gmp is not None:  # GMP: reach the final sparsity and bake the masks into the weights
        prune.report["sparsity"] = prune.gmp.bake()
    ema = ema_model(gm, ffair, st["data"].train_eval) if keep_ema else None
    if prune.gmp is not None and ema is not None:
        prune.gmp.apply_to(ema)
    out = output(st, gm, ema, stats=stats, fair=ffair)
    if dplan is not None:  # --dp-phase search: the masks are DP, this finetune is not (report says so)
        from ..dp import search_report

        out.dp = DPReport.from_dict({**search_report(st.cfg, dplan), "export_weights": out.weights})
    return out

"""Stage ``dp_finetune`` (with ``dp.epsilon``): the finetune under DP-SGD, instead of ``finetune``.

Masks fixed, per-sample clipping + Gaussian noise + Poisson sampling through
opacus, an accountant, and an EMA of the weights (:mod:`relucomp.dp`).  The
gated model is made DP-compatible first (BatchNorm folded, else GroupNorm),
so the later stages lower, evaluate and export the converted model; its
output has the shape of the ``finetune`` stage's (``finetune.tuned(st)``).
"""

from __future__ import annotations

from ..compile_report import DPReport
from .base import RunState
from .finetune import FinetuneOut, output
from .search import dp_batch_size

NAME = "dp_finetune"


def when(st: RunState) -> bool:
    return st.cfg.dp.epsilon is not None and st.cfg.dp.phase in ("finetune", "both")


def run(st: RunState) -> FinetuneOut:
    from ..dp import dp_finetune, options

    cfg, data = st.cfg, st["data"]
    opts = options(cfg, len(data.bundle.train))
    light = st["search"].light

    def save(state):  # after every DP epoch: the whole loop state + what the search stage needs to rebuild
        st.ckpt.save({**state, "search_stats": light})

    resume = st.resuming(NAME)
    res = dp_finetune(st["gates"].gm, data.bundle.train, opts, calib=data.calib, teacher=st["pretrain"].teacher,
                      epochs=cfg.finetune.epochs, batch_size=dp_batch_size(cfg), dplan=st["search"].dp_plan,
                      # None: the DP recipe's LR for the batch and C, once C is known (recipe.dp_finetune_lr)
                      lr=cfg.finetune.lr,
                      kd_weight=cfg.finetune.kd_weight,
                      temperature=cfg.finetune.temperature or cfg.search.kd_temperature, seed=cfg.runtime.seed,
                      ema=cfg.finetune.ema, progress=st.progress, log=st.say, device=cfg.runtime.device,
                      checkpoint=save if st.out is not None else None, resume=resume,
                      fair=heldout_duals(st), heldout=data.bundle.val)
    out = output(st, res.model, res.ema, stats={"history": res.report["history"]})
    out.dp = DPReport.from_dict({**res.report, "export_weights": out.weights})
    return out


def heldout_duals(st: RunState):
    """CEAG under DP (``--fair-method ceag --dp-epsilon``): multipliers from the validation split
    (:class:`relucomp.dp_fairness.HeldOutDuals`, four dual steps per DP epoch); ``None`` for any other method."""
    cfg = st.cfg
    if cfg.fair_method != "ceag":
        return None
    from ..dp_fairness import HeldOutDuals

    bundle = st["data"].bundle
    dense = st["evaluate_dense"].val  # the dense model's predictions on the held-out split
    G = len(bundle.group_names)
    return HeldOutDuals(bundle.val, dense_group_acc=dense.group_acc(G), dense_acc=dense.acc,
                        tolerance=cfg.fairness.tolerance, dual_lr=cfg.fairness.heldout_dual_lr, num_groups=G)

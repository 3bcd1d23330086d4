"""Stage ``search``: choose which ReLUs to keep, to the budget (SNL learned masks or layer-drop).

Also restores a run interrupted in the finetune (the checkpoint holds the
searched, possibly pruned, weights) and binarizes a warm-start state (sweeps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import InternalError
from ..fair_compile import FairPhase
from ..infra import PassManager
from ..passes.insert_gates import gates_of
from ..passes.layer_drop import LayerDropSearchPass
from ..passes.snl_search import SNLSearchPass, binarize_to_budget, hard_count, soft_count
from .base import RunState

NAME = "search"


@dataclass
class SearchOut:
    stats: dict[str, Any] = field(default_factory=dict)   # the pass's stats (with history / lambda trace)
    dp_plan: Any = None   # relucomp.dp.DPPlan when the search ran under DP-SGD (its accountant goes on)

    @property
    def light(self) -> dict[str, Any]:
        return {k: v for k, v in self.stats.items() if k not in ("history", "lambda_trace")}


def fair_phase(st: RunState, phase: str, ema_model=None) -> FairPhase:
    """The fairness term for a training phase (``nft`` outside the configured phase)."""
    f, method = st.cfg.fairness, st.cfg.fair_method
    use = method if f.phase in ("both", phase) else "nft"
    bundle, dense = st["data"].bundle, st["evaluate_dense"]
    ceag = use == "ceag"  # only CEAG compares with the dense references (computed on first use)
    return FairPhase(method=use, num_groups=bundle.num_groups, dense_group_acc=dense.train_group_acc if ceag else None,
                     dense_acc=dense.train_acc if ceag else None, tolerance=f.tolerance, dual_lr=f.dual_lr,
                     ema_model=ema_model,
                     ema_decay=st.cfg.finetune.ema_decay, ema_warmup=bool(st.cfg.finetune.ema_warmup))


def robust_step(st: RunState, kd_weight: float, temperature: float, fair, desc: str, *, clean_only: bool = False):
    """The robust compile's three-way distillation step (``--robust``), else None (CE + KD).  ``clean_only``: its
    clean KD term alone (same teacher, no AugMix or adversarial term) — ``robustness.search_objective = "clean"``."""
    if not st.cfg.robustness.robust:
        return None
    from ..robust_train import robust_kd_step
    from .robust_teacher import train_settings

    rt, rb = st["robust_teacher"], st.cfg.robustness
    clean = {"dense": rt.plain, "dual": rt.clean}.get(rb.clean_teacher)
    s = train_settings(st)
    if rb.student_augmix_ops is not None:      # the student's AugMix views draw from their own op set
        s = dataclasses.replace(s, augmix_ops=rb.student_augmix_ops)
    if clean_only:
        s = dataclasses.replace(s, kd_natural=0.0, kd_adv=0.0, student_jsd=0.0)
    return robust_kd_step(st["pretrain"].teacher, s, kd_weight=kd_weight, temperature=temperature,
                          extra=fair.extra_loss if fair is not None else None, progress=st.progress, desc=desc,
                          clean_teacher=clean, adv_teacher=rt.adversarial)


def run(st: RunState) -> SearchOut:
    cfg, gm, budget = st.cfg, st["gates"].gm, st["model"].gate_budget  # the gates' share of the budget
    resumed = st.resuming("finetune")
    warm = st.hooks.search_state
    if resumed is not None:  # the search had finished before the interruption
        if resumed.get("plan") is not None:  # --dp-phase search: the masks came from the DP search
            out = _dp_resume(st, gm, resumed)
            out.stats = dict(resumed.get("search_stats", {}))
            return out
        if resumed.get("pruning_plan"):  # the checkpoint holds the pruned (smaller) weights
            from ..pruning import apply_plan

            apply_plan(gm, resumed["pruning_plan"])
        gm.load_state_dict(resumed["model"])
        stats = dict(resumed.get("search_stats", {}))
    elif warm is not None:  # warm start (budget sweep): binarize a searched state
        gm.load_state_dict(warm)
        stats = {"warm_start": True, "budget": st["model"].budget, "total_relus": st["model"].before["relus"],
                 "soft_relus_at_start": soft_count(gates_of(gm).values()),
                 "hard_relus": binarize_to_budget(gates_of(gm), budget)}
    elif st.resuming("dp_finetune") is not None:  # interrupted in the DP finetune: its checkpoint holds the masks
        return _dp_resume(st, gm, st.resuming("dp_finetune"))
    elif cfg.dp.epsilon is not None and cfg.dp.phase in ("search", "both"):
        return _dp_search(st, gm, budget)
    elif cfg.search.method == "snl":
        s, ungated = cfg.search, st["model"].budget - budget
        # a sweep names user budgets; the gates reach them at ``budget − ungated`` kept ReLUs
        snaps = [b - ungated for b in st.hooks.search_snapshots if b > ungated]
        hook = st.hooks.on_snapshot
        on_snap = (lambda b, sd: hook(b + ungated, sd)) if hook is not None and ungated else hook
        sfair = fair_phase(st, "search") if cfg.fairness.phase in ("search", "both") and cfg.fair_method != "nft" else None
        sp = SNLSearchPass(budget=budget, train_loader=st["data"].train, teacher=st["pretrain"].teacher,
                           epochs=s.epochs, lr=s.lr, alpha_lr=s.alpha_lr, kd_weight=s.kd_weight, temperature=s.kd_temperature,
                           progress=st.progress,
                           extra_loss=sfair.extra_loss if sfair else None,
                           after_step=sfair.after_step if sfair else None,
                           checkpoint=st.ckpt.save if st.out is not None else None,
                           resume=st.resuming(NAME), device=cfg.runtime.device,
                           snapshots=snaps, on_snapshot=on_snap,
                           warmup=s.warmup, hysteresis=s.hysteresis, refine=s.refine, seed=cfg.runtime.seed,
                           clip_grad_norm=s.clip_grad_norm,
                           loss_step=robust_step(st, s.kd_weight, s.kd_temperature, sfair, NAME,
                                                 clean_only=cfg.robustness.search_objective == "clean"))
        stats = PassManager([sp]).run(gm).stats["passes"][0]["stats"]
        if sfair is not None:
            stats["fair_trajectory"] = sfair.trajectory
    else:
        sp = LayerDropSearchPass(budget=budget, calib_loader=st["data"].val, device=cfg.runtime.device)
        stats = PassManager([sp]).run(gm).stats["passes"][0]["stats"]
    from ..distributed import broadcast_module_

    broadcast_module_(gm)  # multi-process: every rank continues from rank 0's masks and weights (identical already)
    if hard_count(gates_of(gm).values()) > budget:  # never above budget
        raise InternalError(f"search produced {hard_count(gates_of(gm).values())} ReLUs, above the budget {budget}")
    return SearchOut(stats=stats)


def dp_batch_size(cfg) -> int:
    """The expected Poisson batch under DP: ``dp.batch_size`` or max(``runtime.batch_size``, 256)."""
    return cfg.dp.batch_size or max(cfg.runtime.batch_size, 256)


def _dp_search(st: RunState, gm, budget: int) -> SearchOut:
    """The mask search under DP-SGD (``dp.phase`` search / both): one privacy plan for search + finetune."""
    from ..dp import dp_search, make_dp_compatible, options, plan

    cfg, data = st.cfg, st["data"]
    opts = options(cfg, len(data.bundle.train))
    gm, changes = make_dp_compatible(gm, data.calib)  # BatchNorm folded before the search (per-sample clipping)
    st["gates"].gm = gm
    dplan = plan(opts, len(data.bundle.train), batch_size=dp_batch_size(cfg), search_epochs=cfg.search.epochs,
                 finetune_epochs=cfg.finetune.epochs)
    dplan.conversion = changes
    s = cfg.search
    stats = dp_search(gm, data.bundle.train, opts, dplan, budget=budget, teacher=st["pretrain"].teacher, lr=s.lr,
                      alpha_lr=s.alpha_lr, kd_weight=s.kd_weight, temperature=s.kd_temperature, warmup=s.warmup,
                      hysteresis=s.hysteresis, seed=cfg.runtime.seed, progress=st.progress, log=st.say,
                      device=cfg.runtime.device)
    if hard_count(gates_of(gm).values()) > budget:
        raise InternalError(f"DP search produced {hard_count(gates_of(gm).values())} ReLUs, above the budget {budget}")
    return SearchOut(stats=stats, dp_plan=dplan)


def _dp_resume(st: RunState, gm, state: dict) -> SearchOut:
    """Rebuild the searched, DP-converted model and the privacy plan (with the accountant's history) from the
    DP finetune's checkpoint; the dp_finetune stage then continues its loop from the same state."""
    from ..dp import make_dp_compatible, options, plan_from_state

    gm, _ = make_dp_compatible(gm, st["data"].calib)
    st["gates"].gm = gm
    gm.load_state_dict(state["model"])
    opts = options(st.cfg, len(st["data"].bundle.train))
    st.say("resuming: the DP-converted model and the accountant's history come from the checkpoint")
    dplan = plan_from_state(state["plan"], opts, state["accountant"]) if state.get("plan") else None
    return SearchOut(stats=dict(state.get("search_stats", {})), dp_plan=dplan)

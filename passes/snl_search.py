"""SNLSearchPass: learn which ReLUs to keep, then binarize to the budget exactly.

Selective Network Linearization (Cho et al., ICML'22), with exact budget control:

1. **Search.**  Train weights and gate values ``a`` (``y = x + a·(relu(x) − x)``)
   on ``(1−w)·CE + w·KD(teacher) + λ·L1(a)`` where the L1 term is the soft
   ReLU count normalised by the model's total count.  The soft count
   (entries with ``a > threshold``) should fall geometrically from the total
   to the budget by ``reach`` of the search steps.  ``a`` is clamped to [0, 1].

   * ``schedule="gradual"`` (default): **rank before committing.**  The
     first ``warmup`` fraction of the steps only trains (weights, gates and
     the linear replacements; the L1 term ranks the entries), nothing is
     pinned.  Then, every ``check_every`` steps, the live set is re-chosen as
     the top entries by gate value that fit the schedule's target (geometric
     from the total to the budget, reached at ``reach`` of the steps); the
     rest are pinned linear.  Pinning is **reversible** (hysteresis, as
     AutoReP): a pinned entry keeps a shadow score ``a`` that still receives
     the gradient (straight-through), and it re-opens when that score beats a
     live entry's by more than ``hysteresis``.  Steps after ``reach`` keep the
     count at the budget and let the weights settle — the *recovery plateau*
     (see "Resume" below for why it is there on purpose).
   * ``schedule="lambda"`` (SNL's own control): no pinning; ``λ`` grows
     ×``lam_up`` when the soft count is above the schedule and shrinks
     ÷``lam_down`` when it is far below.
2. **Binarize.**  Global top-k over all gate entries by ``a`` (cost = ReLUs an
   entry controls): entries are taken greedily in decreasing ``a`` while the
   running total stays ≤ budget, so the hard count is **never above the
   budget** (SNL's own thresholding can overshoot).  Ties break by site order.

3. **Refine** (``refine`` rounds, optional): swap kept ↔ linear entries of
   equal cost, proposed by the first-order loss change ``∂L/∂a`` at the
   binarized mask and **accepted only when the measured loss on a fixed
   calibration set (``refine_batches`` train batches) goes down** — a
   discrete, block-coordinate-descent step in the spirit of coordinate
   descent for network linearization.  The count never changes.

Linear replacements (``replacement="affine"`` gates) are trained with the
weights; they need no separate treatment here.

**Resume.**  The checkpoint holds the whole search state: model (weights,
gates, shadow scores, pins = ``mask``), both optimizers' moments, λ, the trace,
snapshots, the schedule position (epoch *and* batch) and the RNG streams (the
loader's generator at the epoch start, the global torch RNG), so a resumed run
repeats the uninterrupted one step for step.  Before this, a resume restarted the interrupted epoch from its first batch: the step
counter — and with it the pin schedule — went back while the pins stayed, so the resumed run had a
stretch of pin-free steps in which the network recovered from the pins so far (the interrupted demo
ended at 79 % instead of 28 %).  The recipe keeps such recovery on purpose: the warm-up (rank before
pinning), small reversible pin steps, and the recovery plateau after ``reach``.  The 28 % itself came
mostly from ties: gate values clipped at 1.0 tied and a stable sort gave the budget to the first
layers in graph order; scores are therefore unclipped (the forward clips, gradients pass straight
through) and exact ties get a fixed seeded jitter.

The pass changes the function (training), so the PassManager only lints it.
Running it again on hard gates does nothing (``modified=False``).
An optional ``extra_loss(logits, y, g)`` (e.g. fairness constraints) is added
to the primal loss, and ``after_step`` hooks (dual updates) run each step.

**Snapshots (budget sweeps).**  With ``snapshots=[b1, b2, ...]`` and
``on_snapshot(budget, state_dict)``, one search serves several budgets: the
search descends to ``budget`` (the smallest) as usual, and the first time the
soft count is ≤ ``b`` (checked every ``check_every`` steps) a CPU copy of the
gated model's state_dict (soft gates, before binarization) is handed to
``on_snapshot(b, state)``.  Budgets never reached softly, and any ≤ ``budget``,
get the end-of-search state.  Each budget is reported once, also across a
checkpoint/resume; ``stats["snapshots"]`` records when each was taken.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.nn import ReLUGate
from relucomp.passes.insert_gates import gates_of
from relucomp.train import LoopState, ce_kd_step, on_device, train_loop


def soft_count(gates: Iterable[ReLUGate], threshold: float = 1e-2) -> int:
    return sum(g.kept_relus(threshold) for g in gates)


def hard_count(gates: Iterable[ReLUGate]) -> int:
    return sum(int(g.mask.sum().item()) * g.elements_per_gate for g in gates)


@torch.no_grad()
def binarize_to_budget(gates: dict[str, ReLUGate], budget: int, *, scores: dict[str, torch.Tensor] | None = None) -> int:
    """Set every gate hard so that the total kept ReLUs is ≤ ``budget``; return the count.

    ``scores`` (default: the gate values ``a``) rank entries; an entry of cost
    ``c`` is kept if it fits in what is left of the budget.
    """
    if budget < 0:
        raise ValueError("budget must be ≥ 0")
    names = list(gates)
    flat_scores, costs, owners, offsets = [], [], [], []
    for i, name in enumerate(names):
        g = gates[name]
        # default score: the gate value of live entries (pinned entries count as 0)
        s = (scores[name] if scores is not None else g.alpha.detach() * g.mask).reshape(-1).float()
        flat_scores.append(s)
        costs.append(torch.full_like(s, float(g.elements_per_gate)))
        owners.append(torch.full((s.numel(),), i, dtype=torch.long))
        offsets.append(torch.arange(s.numel()))
    s = torch.cat(flat_scores)
    c = torch.cat(costs)
    own = torch.cat(owners)
    off = torch.cat(offsets)
    # stable sort: descending score, ties by (site order, position)
    order = torch.argsort(-s, stable=True)
    keep = torch.zeros_like(s, dtype=torch.bool)
    if bool(torch.all(c == 1)):
        keep[order[: min(budget, s.numel())]] = True
    else:
        remaining = budget
        cs = c[order].tolist()
        for rank, cost in enumerate(cs):
            if cost <= remaining:
                keep[order[rank]] = True
                remaining -= cost
            if remaining <= 0:
                break
    total = 0
    for i, name in enumerate(names):
        g = gates[name]
        sel = own == i
        m = torch.zeros(g.alpha.numel())
        m[off[sel][keep[sel]]] = 1.0
        g.set_mask(m.reshape(g.alpha.shape))
        total += int(m.sum().item()) * g.elements_per_gate
    assert total <= budget, (total, budget)
    return total


class ShortScheduleWarning(UserWarning):
    """The search schedule is too short to rank the ReLUs before pinning them."""


def _flat(gates: Sequence[ReLUGate], fn) -> torch.Tensor:
    return torch.cat([fn(g).reshape(-1).float() for g in gates])


def _costs(gates: Sequence[ReLUGate]) -> torch.Tensor:
    return torch.cat([torch.full((g.alpha.numel(),), float(g.elements_per_gate)) for g in gates])


def _scatter_mask(gates: Sequence[ReLUGate], live: torch.Tensor, *, hard: bool) -> None:
    start = 0
    for g in gates:
        n = g.alpha.numel()
        m = live[start:start + n].reshape(g.alpha.shape).to(g.mask.dtype)
        if hard:
            g.set_mask(m)
        else:
            g.mask.copy_(m)
        start += n


def select_live(scores: torch.Tensor, costs: torch.Tensor, k: float) -> torch.Tensor:
    """Boolean selection of the highest-scoring entries whose cumulative cost stays ≤ ``k``."""
    order = torch.argsort(scores, descending=True, stable=True)
    ok = torch.cumsum(costs[order], 0) <= k + 1e-6
    live = torch.zeros_like(scores, dtype=torch.bool)
    live[order[ok]] = True
    return live


@torch.no_grad()
def _calib_loss(gm, batches, teacher_logits, kd_weight, temperature) -> float:
    from relucomp.train import kd_loss

    tot = 0.0
    for (x, y), t in zip(batches, teacher_logits):
        logits = gm(x)
        loss = F.cross_entropy(logits, y)
        if t is not None and kd_weight > 0:
            loss = (1 - kd_weight) * loss + kd_weight * kd_loss(logits, t, temperature)
        tot += float(loss)
    return tot / max(len(batches), 1)


def refine_masks(gm: nn.Module, gates: dict[str, ReLUGate], batches: list, *, teacher: nn.Module | None = None,
                 rounds: int = 3, fraction: float = 0.05, kd_weight: float = 0.5, temperature: float = 4.0) -> dict:
    """Discrete refinement of hard gates: swap kept ↔ linear entries of equal cost when the measured loss drops.

    Each round: ``∂L/∂a`` at the binarized mask (one backward over ``batches``,
    BN in eval mode) gives the first-order loss change of flipping each entry;
    the best ``fraction`` of the kept count is proposed as pairs (drop the
    kept entry whose removal costs least, add the linear entry whose opening
    gains most, equal cost) and the swap is kept only if the loss measured on
    ``batches`` is lower; otherwise the proposal is halved once.
    """
    gl = [g for g in gates.values() if bool(g.hard)]
    if not gl or not batches or rounds <= 0:
        return {"rounds": 0, "swaps": 0}
    was = gm.training
    gm.eval()
    t_logits = ([on_device(teacher, x.device)(x) for x, _ in batches] if teacher is not None
                else [None] * len(batches))
    if teacher is not None:
        t_logits = [t.detach() for t in t_logits]
    costs = _costs(gl)
    base = _calib_loss(gm, batches, t_logits, kd_weight, temperature)
    start_loss, swaps, trace = base, 0, []
    for r in range(rounds):
        mask = _flat(gl, lambda g: g.mask).bool()
        # gradient of the loss w.r.t. a at the current mask (soft form, a = mask, nothing pinned)
        saved = [(g.alpha.requires_grad,) for g in gl]
        for g in gl:
            g.hard.fill_(False)
            g.alpha.data.copy_(g.mask)
            g.alpha.requires_grad_(True)
            g.alpha.grad = None
            g.mask.fill_(1.0)
        from relucomp.train import kd_loss

        for (x, y), t in zip(batches, t_logits):
            with torch.enable_grad():
                logits = gm(x)
                loss = F.cross_entropy(logits, y)
                if t is not None and kd_weight > 0:
                    loss = (1 - kd_weight) * loss + kd_weight * kd_loss(logits, t, temperature)
                loss.backward()
        grad = _flat(gl, lambda g: g.alpha.grad if g.alpha.grad is not None else torch.zeros_like(g.alpha))
        for g, (rg,) in zip(gl, saved):
            g.alpha.grad = None
            g.alpha.requires_grad_(rg)
        _scatter_mask(gl, mask, hard=True)
        # removing a kept entry changes L by ≈ −grad; opening a linear one by ≈ +grad
        n_kept = int(mask.sum())
        m = max(1, int(fraction * n_kept))
        accepted = False
        while m >= 1 and not accepted:
            new = mask.clone()
            n_sw = 0
            for c in costs.unique():
                sel_c = costs == c
                kept_idx = torch.nonzero(mask & sel_c).flatten()
                lin_idx = torch.nonzero(~mask & sel_c).flatten()
                if kept_idx.numel() == 0 or lin_idx.numel() == 0:
                    continue
                drop_cost = -grad[kept_idx]          # loss increase when removed (smaller is better)
                add_gain = grad[lin_idx]             # loss change when opened (more negative is better)
                d_ord = kept_idx[torch.argsort(drop_cost)]
                a_ord = lin_idx[torch.argsort(add_gain)]
                kmax = min(m, d_ord.numel(), a_ord.numel())
                net = drop_cost[torch.argsort(drop_cost)][:kmax] + add_gain[torch.argsort(add_gain)][:kmax]
                kk = int((net < 0).sum())
                if kk == 0:
                    continue
                new[d_ord[:kk]] = False
                new[a_ord[:kk]] = True
                n_sw += kk
            if n_sw == 0:
                break
            _scatter_mask(gl, new, hard=True)
            loss_new = _calib_loss(gm, batches, t_logits, kd_weight, temperature)
            if loss_new < base:
                accepted, base, swaps = True, loss_new, swaps + n_sw
                trace.append({"round": r + 1, "swapped": n_sw, "loss": round(loss_new, 5)})
            else:
                _scatter_mask(gl, mask, hard=True)
                m //= 2
        if not accepted:
            break
    for p in gm.parameters():
        p.grad = None
    gm.train(was)
    return {"rounds": len(trace), "swaps": swaps, "loss_before": round(start_loss, 5), "loss_after": round(base, 5),
            "trace": trace}


class SNLSearchPass(Pass):
    preserves_semantics = False

    def __init__(
        self,
        *,
        budget: int,
        train_loader: Iterable,
        teacher: nn.Module | None = None,
        epochs: int = 5,
        lr: float = 0.01,
        alpha_lr: float = 0.02,
        lam: float = 1.0,
        lam_up: float = 1.25,
        lam_down: float = 1.1,
        reach: float = 0.6,
        threshold: float = 1e-2,
        kd_weight: float = 0.5,
        temperature: float = 4.0,
        check_every: int = 2,
        warmup: float = 0.15,
        hysteresis: float = 0.05,
        refine: int = 3,
        refine_fraction: float = 0.05,
        refine_batches: int = 4,
        extra_loss: Callable | None = None,
        after_step: Callable[[int], None] | None = None,
        progress: Any | None = None,
        checkpoint: Callable[[dict], None] | None = None,
        resume: dict | None = None,
        device: str = "cpu",
        snapshots: Sequence[int] = (),
        on_snapshot: Callable[[int, dict], None] | None = None,
        schedule: str = "gradual",
        seed: int = 0,
        loss_step: Callable | None = None,
        clip_grad_norm: float | None = None,
    ):
        if schedule not in ("gradual", "lambda"):
            raise ValueError("schedule must be 'gradual' or 'lambda'")
        if not 0.0 <= warmup < 1.0:
            raise ValueError("warmup must be in [0, 1)")
        if not 0.0 < reach <= 1.0:
            raise ValueError("reach must be in (0, 1]")
        if hysteresis < 0 or check_every < 1 or refine < 0 or not 0 < refine_fraction <= 1:
            raise ValueError("hysteresis ≥ 0, check_every ≥ 1, refine ≥ 0, refine_fraction in (0, 1] required")
        self.schedule = schedule
        self.budget = int(budget)
        self.snapshots = sorted({int(b) for b in snapshots}, reverse=True)
        if self.snapshots and on_snapshot is None:
            raise ValueError("snapshots need an on_snapshot(budget, state_dict) callback")
        self.on_snapshot = on_snapshot
        self.loader = train_loader
        self.teacher = teacher
        self.epochs = epochs
        self.lr, self.alpha_lr = lr, alpha_lr
        self.lam, self.lam_up, self.lam_down = lam, lam_up, lam_down
        self.reach, self.threshold = reach, threshold
        self.kd_weight, self.temperature = kd_weight, temperature
        self.check_every = check_every
        self.warmup, self.hysteresis = warmup, hysteresis
        self.refine, self.refine_fraction, self.refine_batches = refine, refine_fraction, refine_batches
        self.extra_loss, self.extra_after_step = extra_loss, after_step
        self.progress = progress
        self.checkpoint = checkpoint
        self.resume = resume
        self.device = device
        self.seed = seed
        self.loss_step = loss_step   # a train_loop StepFn replacing CE + KD (the robust compile's objective)
        self.clip_grad_norm = clip_grad_norm  # the weights' gradient norm cap (None: off)

    def call(self, gm: fx.GraphModule) -> PassResult:
        gates = gates_of(gm)
        soft = [g for g in gates.values() if not bool(g.hard)]
        if not soft:
            return PassResult(gm, False, {"reason": "no soft gates"})
        total = sum(g.total_relus for g in gates.values())
        gate_params = [g.alpha for g in soft]
        rep_params = [p for g in soft for p in (g.rep_scale, g.rep_shift) if p.requires_grad]
        skip_ids = {id(p) for p in gate_params + rep_params}
        weights = [p for p in gm.parameters() if id(p) not in skip_ids and p.requires_grad]
        groups = [{"params": weights, "lr": self.lr, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}]
        if rep_params:  # linear replacements: no weight decay (it would pull s toward 0, not 1)
            groups.append({"params": rep_params, "lr": self.lr, "momentum": 0.9, "weight_decay": 0.0, "nesterov": True})
        opt = torch.optim.SGD(groups)
        opt_a = torch.optim.Adam(gate_params, lr=self.alpha_lr)
        n_batches = len(self.loader)
        total_steps = max(1, self.epochs * n_batches)
        warm_steps = int(round(self.warmup * total_steps))
        reach_steps = max(warm_steps + 1, int(round(self.reach * total_steps)))
        warns = []
        n_checks = (reach_steps - warm_steps) // self.check_every
        if self.schedule == "gradual" and self.budget < total and (warm_steps < 10 or n_checks < 10):
            warns.append(f"the search has {total_steps} steps ({self.epochs} epochs × {n_batches} batches): "
                         f"{warm_steps} warm-up steps and {n_checks} pin steps are too few to rank "
                         f"{total:,} ReLUs; the mask will be close to a guess — give more search epochs "
                         f"(e.g. --effort standard) or a smaller batch size")
            warnings.warn(warns[-1], ShortScheduleWarning, stacklevel=2)
        state = {"lam": self.lam, "trace": [], "snapshots": {}, "reopened": 0}
        loop = LoopState()
        if self.resume:
            gm.load_state_dict(self.resume["model"])
            opt.load_state_dict(self.resume["optimizer"])
            opt_a.load_state_dict(self.resume["optimizer_alpha"])
            state["lam"] = float(self.resume["lam"])
            state["trace"] = list(self.resume.get("trace", []))
            state["reopened"] = int(self.resume.get("reopened", 0))
            state["snapshots"] = {int(k): v for k, v in (self.resume.get("snapshots") or {}).items()}
            loop = LoopState(self.resume.get("loop") or {"epoch": int(self.resume["epoch"])})

        base_step = self.loss_step or ce_kd_step(self.teacher, kd_weight=self.kd_weight,
                                                 temperature=self.temperature, extra=self.extra_loss)
        cost = {id(g): g.elements_per_gate / total for g in soft}
        costs = _costs(soft)
        # a fixed per-entry jitter far below any learned difference: exact ties never fall back to graph order
        tie = torch.rand(costs.numel(), generator=torch.Generator().manual_seed(self.seed)) * 1e-6

        def step_fn(model, x, y, g):
            loss, logits = base_step(model, x, y, g)
            l1 = sum(gt.alpha.sum() * cost[id(gt)] for gt in soft)
            opt_a.zero_grad(set_to_none=True)
            return loss + state["lam"] * l1, logits

        def target(step: int) -> float:
            if step <= warm_steps:
                return float(total)
            frac = min(1.0, (step - warm_steps) / max(1, reach_steps - warm_steps))
            b = max(self.budget, 1)
            return total * (b / total) ** frac

        def take_snapshots(step: int, cnt: int, final: bool = False):
            for b in self.snapshots:
                if b in state["snapshots"] or not (final or (b > self.budget and cnt <= b)):
                    continue
                state["snapshots"][b] = {"step": step, "soft_relus": cnt, "reached": cnt <= b}
                self.on_snapshot(b, {k: v.detach().cpu().clone() for k, v in gm.state_dict().items()})

        @torch.no_grad()
        def pin_to(k: float) -> None:
            """Re-choose the live set: top entries by score (+ hysteresis for live ones) within ``k`` ReLUs."""
            if k >= total:
                return
            live_now = _flat(soft, lambda g: g.mask) > 0.5
            scores = _flat(soft, lambda g: g.alpha.detach()) + self.hysteresis * live_now.float() + tie
            live = select_live(scores, costs, k)
            state["reopened"] += int((live & ~live_now).sum())
            _scatter_mask(soft, live, hard=False)

        def set_plateau(step: int) -> None:
            on = self.schedule == "gradual" and step >= reach_steps
            for gt in soft:
                gt.straight = on

        def after(step: int):
            opt_a.step()
            set_plateau(step)
            for gt in soft:
                gt.clamp_()
            if self.extra_after_step is not None:
                self.extra_after_step(step)
            if step % self.check_every == 0:
                tgt = target(step)
                if self.schedule == "gradual":
                    pin_to(tgt)
                cnt = soft_count(soft, self.threshold)
                if self.schedule == "lambda":
                    if cnt > tgt:
                        state["lam"] *= self.lam_up
                    elif cnt < 0.8 * tgt:
                        state["lam"] /= self.lam_down
                state["trace"].append([step, cnt, round(tgt), state["lam"]])
                if self.snapshots:
                    take_snapshots(step, cnt)

        def on_epoch_end(epoch, rec):
            return {"soft_relus": soft_count(soft, self.threshold), "lam": state["lam"]}

        def save(next_epoch: int, interrupted: bool):
            if self.checkpoint is not None:
                self.checkpoint({"phase": "search", "epoch": next_epoch, "model": gm.state_dict(),
                                 "optimizer": opt.state_dict(), "optimizer_alpha": opt_a.state_dict(),
                                 "lam": state["lam"], "trace": state["trace"], "reopened": state["reopened"],
                                 "snapshots": dict(state["snapshots"]), "loop": loop.to_dict()})

        gm.to(self.device)
        set_plateau(loop.epoch * n_batches + loop.batch)
        history = train_loop(gm, self.loader, epochs=self.epochs, optimizer=opt, step_fn=step_fn,
                             desc="search (SNL)", progress=self.progress, after_step=after,
                             on_epoch_end=on_epoch_end, save=save, device=self.device, loop_state=loop,
                             clip_grad_norm=self.clip_grad_norm)
        for gt in soft:
            gt.straight = False
        soft_final = soft_count(soft, self.threshold)
        if self.snapshots:
            take_snapshots(self.epochs * n_batches, soft_final, final=True)
        # binarize: live entries first (by gate value), pinned ones after them by shadow score;
        # a seeded jitter far below any learned difference breaks exact ties (no training: no graph-order bias)
        gen = torch.Generator().manual_seed(self.seed)
        scores = {}
        for name, g in gates.items():
            a = g.alpha.detach().float()
            jitter = torch.rand(a.shape, generator=gen) * 1e-6
            scores[name] = (g.mask * 10.0 + a + jitter) if not bool(g.hard) else g.mask.float()
        kept = binarize_to_budget(gates, self.budget, scores=scores)
        refine_stats = {"rounds": 0, "swaps": 0}
        if self.refine > 0 and self.budget > 0:
            batches = []
            for x, y, *_ in self.loader:
                batches.append((x.to(self.device), y.to(self.device)))
                if len(batches) >= self.refine_batches:
                    break
            refine_stats = refine_masks(gm, gates, batches, teacher=self.teacher, rounds=self.refine,
                                        fraction=self.refine_fraction, kd_weight=self.kd_weight,
                                        temperature=self.temperature)
            kept = hard_count(gates.values())
        per_layer = {name: g.kept_relus() for name, g in gates.items()}
        stats = {"budget": self.budget, "total_relus": total, "soft_relus_at_end": soft_final,
                 "reached_budget_softly": soft_final <= self.budget, "hard_relus": kept,
                 "warmup_steps": warm_steps, "reach_steps": reach_steps, "total_steps": total_steps,
                 "reopened": state["reopened"], "refine": refine_stats, "kept_per_layer": per_layer,
                 "warnings": warns,
                 "lambda_final": state["lam"], "history": history, "lambda_trace": state["trace"][-200:]}
        if self.snapshots:
            stats["snapshots"] = {str(b): v for b, v in sorted(state["snapshots"].items(), reverse=True)}
        return PassResult(gm, True, stats)

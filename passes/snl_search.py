"""SNLSearchPass: learn which ReLUs to keep, then binarize to the budget exactly.

Selective Network Linearization (Cho et al., ICML'22), with exact budget control:

1. **Search.**  Train weights and gate values ``a`` (``y = x + a·(relu(x) − x)``)
   on ``(1−w)·CE + w·KD(teacher) + λ·L1(a)`` where the L1 term is the soft
   ReLU count normalised by the model's total count.  The soft count
   (entries with ``a > threshold``) should fall geometrically from the total
   to the budget by ``reach`` of the search steps.  ``a`` is clamped to [0, 1].

   * ``schedule="gradual"`` (default): every ``check_every`` steps the
     lowest-``a`` entries beyond the schedule's target are pinned linear
     (``a = 0`` for the rest of the search), like gradual magnitude pruning
     applied to ReLUs; the L1 term (fixed ``λ``) ranks the entries.  The
     network adapts while ReLUs disappear, the count tracks the schedule
     exactly and never undershoots the budget.
   * ``schedule="lambda"`` (SNL's own control): no pinning; ``λ`` grows
     ×``lam_up`` when the soft count is above the schedule and shrinks
     ÷``lam_down`` when it is far below.
2. **Binarize.**  Global top-k over all gate entries by ``a`` (cost = ReLUs an
   entry controls): entries are taken greedily in decreasing ``a`` while the
   running total stays ≤ budget, so the hard count is **never above the
   budget** (SNL's own thresholding can overshoot).  Ties break by site order.

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

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.nn import ReLUGate
from relucomp.passes.insert_gates import gates_of
from relucomp.train import ce_kd_step, train_loop


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
        s = (scores[name] if scores is not None else g.alpha.detach()).reshape(-1).float()
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
        reach: float = 0.8,
        threshold: float = 1e-2,
        kd_weight: float = 0.5,
        temperature: float = 4.0,
        check_every: int = 5,
        extra_loss: Callable | None = None,
        after_step: Callable[[int], None] | None = None,
        progress: Any | None = None,
        checkpoint: Callable[[dict], None] | None = None,
        resume: dict | None = None,
        device: str = "cpu",
        snapshots: Sequence[int] = (),
        on_snapshot: Callable[[int, dict], None] | None = None,
        schedule: str = "gradual",
    ):
        if schedule not in ("gradual", "lambda"):
            raise ValueError("schedule must be 'gradual' or 'lambda'")
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
        self.extra_loss, self.extra_after_step = extra_loss, after_step
        self.progress = progress
        self.checkpoint = checkpoint
        self.resume = resume
        self.device = device

    def call(self, gm: fx.GraphModule) -> PassResult:
        gates = gates_of(gm)
        soft = [g for g in gates.values() if not bool(g.hard)]
        if not soft:
            return PassResult(gm, False, {"reason": "no soft gates"})
        total = sum(g.total_relus for g in gates.values())
        gate_params = [g.alpha for g in soft]
        gate_ids = {id(p) for p in gate_params}
        weights = [p for p in gm.parameters() if id(p) not in gate_ids and p.requires_grad]
        opt = torch.optim.SGD([
            {"params": weights, "lr": self.lr, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
        ])
        opt_a = torch.optim.Adam(gate_params, lr=self.alpha_lr)
        n_batches = len(self.loader)
        total_steps = max(1, self.epochs * n_batches)
        state = {"lam": self.lam, "trace": [], "snapshots": {}}
        start_epoch = 0
        if self.resume:
            gm.load_state_dict(self.resume["model"])
            opt.load_state_dict(self.resume["optimizer"])
            opt_a.load_state_dict(self.resume["optimizer_alpha"])
            state["lam"] = float(self.resume["lam"])
            start_epoch = int(self.resume["epoch"])
            state["trace"] = list(self.resume.get("trace", []))
            state["snapshots"] = {int(k): v for k, v in (self.resume.get("snapshots") or {}).items()}

        base_step = ce_kd_step(self.teacher, kd_weight=self.kd_weight, temperature=self.temperature,
                               extra=self.extra_loss)
        cost = {id(g): g.elements_per_gate / total for g in soft}

        def step_fn(model, x, y, g):
            loss, logits = base_step(model, x, y, g)
            l1 = sum(gt.alpha.sum() * cost[id(gt)] for gt in soft)
            opt_a.zero_grad(set_to_none=True)
            return loss + state["lam"] * l1, logits

        def target(step: int) -> float:
            frac = min(1.0, step / (self.reach * total_steps))
            b = max(self.budget, 1)
            return total * (b / total) ** frac

        def take_snapshots(step: int, cnt: int, final: bool = False):
            for b in self.snapshots:
                if b in state["snapshots"] or not (final or (b > self.budget and cnt <= b)):
                    continue
                state["snapshots"][b] = {"step": step, "soft_relus": cnt, "reached": cnt <= b}
                self.on_snapshot(b, {k: v.detach().cpu().clone() for k, v in gm.state_dict().items()})

        def pin_to(k: float) -> None:
            """Pin the lowest-``a`` live entries linear until at most ``k`` ReLUs stay live."""
            scores = torch.cat([(gt.alpha.detach() * gt.mask).reshape(-1) for gt in soft])
            costs = torch.cat([torch.full((gt.alpha.numel(),), float(gt.elements_per_gate)) for gt in soft])
            live = scores > 0
            if float(costs[live].sum()) <= k:
                return
            order = torch.argsort(scores, descending=True, stable=True)
            keep_sorted = torch.cumsum(costs[order] * live[order], 0) <= k
            drop = torch.ones_like(live)
            drop[order[keep_sorted]] = False
            drop &= live
            start = 0
            for gt in soft:
                n = gt.alpha.numel()
                idx = torch.nonzero(drop[start:start + n]).flatten()
                if idx.numel():
                    gt.pin_linear_(idx)
                start += n

        def after(step: int):
            opt_a.step()
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
                                 "lam": state["lam"], "trace": state["trace"],
                                 "snapshots": dict(state["snapshots"])})

        gm.to(self.device)
        history = train_loop(gm, self.loader, epochs=self.epochs, optimizer=opt, step_fn=step_fn,
                             start_epoch=start_epoch, desc="search (SNL)", progress=self.progress,
                             after_step=after, on_epoch_end=on_epoch_end, save=save, device=self.device)
        soft_final = soft_count(soft, self.threshold)
        if self.snapshots:
            take_snapshots(self.epochs * n_batches, soft_final, final=True)
        kept = binarize_to_budget(gates, self.budget)
        stats = {"budget": self.budget, "total_relus": total, "soft_relus_at_end": soft_final,
                 "reached_budget_softly": soft_final <= self.budget, "hard_relus": kept,
                 "lambda_final": state["lam"], "history": history, "lambda_trace": state["trace"][-200:]}
        if self.snapshots:
            stats["snapshots"] = {str(b): v for b, v in sorted(state["snapshots"].items(), reverse=True)}
        return PassResult(gm, True, stats)

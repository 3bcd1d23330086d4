"""Pruning policy: channel importance, selection under a ratio or a MAC budget, GMP setup.

The three layers (as in Torch-Pruning):

* **analysis** — :mod:`relucomp.passes.prune_analysis`: which channels are
  coupled (units) and what the graph costs as a function of pruned units;
* **mechanism** — :mod:`relucomp.passes.prune_channels`: per-op slicing;
* **policy** — this module: how important each unit is and which units go.

Importance of a unit (one coupled channel), summed over the unit's *output
slices* — the conv/linear filter rows (and depthwise filters) producing it:

``l1``      Σ |w|  (filter L1 norm, Li et al. 2017)
``l2``      sqrt(Σ w²)
``bn``      Σ |γ| of its BatchNorms (Network Slimming); units without BN fall back to ``l1``
``taylor``  Σ over slices (filter rows + bias, BatchNorm γ/β) of |Σ w·∂L/∂w| — the first-order
            change of the loss when the slice is zeroed (Molchanov et al. 2019), gradients
            accumulated over a calibration set (labels, or the model's own predictions)

A callable ``importance(gm, graph) -> array`` (one score per unit) is also accepted.

Scope ``global`` ranks all prunable units of the model at once after dividing
each unit's score by the mean score of its group (so layers of different
scale compare); ``uniform`` prunes the same fraction of every group.  A layer
is never emptied: a unit whose removal would leave a conv/linear with no
output channel is skipped (and a plan that would do so is refused).

``mac_budget`` prunes, in ``steps`` rounds with importance recomputed after
each (iterative pruning), the lowest-ranked units until the MACs per image
are ≤ the budget; the cost model is exact, so the result is the smallest
prefix of the ranking that meets the budget.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .budget import parse_count
from .errors import BudgetError, RelucompError
from .passes.gmp import GMP, MagnitudePrunePass, cubic_sparsity, magnitude_masks, prunable_weights, weight_sparsity
from .passes.prune_analysis import ChannelDependencyPass, ChannelGraph, analyze_channels, own_meta
from .passes.prune_channels import ChannelPrunePass, example_from_meta, apply_plan, plan_from_units
from .nn import ReLUGate
from .passes.shape_prop import ShapeAnalysisPass, layer_table

IMPORTANCES = ("l1", "l2", "bn", "taylor")
SCOPES = ("global", "uniform")

__all__ = [
    "IMPORTANCES", "SCOPES", "GMP", "ChannelDependencyPass", "ChannelPrunePass", "MagnitudePrunePass",
    "analyze_channels", "apply_plan", "cubic_sparsity", "magnitude_masks", "prunable_weights", "weight_sparsity",
    "unit_importance", "select_units", "prune", "make_gmp", "model_costs", "compile_hook", "chain_steps",
    "pruning_plan_of",
]


# ---------------------------------------------------------------------------
# importance
# ---------------------------------------------------------------------------

def _calib_batches(calib, max_batches: int = 8) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    if calib is None:
        raise RelucompError("Taylor importance needs calibration data", "pass calib=(x, y), a tensor x or a loader")
    if isinstance(calib, torch.Tensor):
        return [(calib, None)]
    if isinstance(calib, (tuple, list)) and len(calib) >= 2 and isinstance(calib[0], torch.Tensor) \
            and isinstance(calib[1], torch.Tensor) and calib[1].dim() == 1 and calib[1].shape[0] == calib[0].shape[0]:
        return [(calib[0], calib[1])]
    out = []
    for i, batch in enumerate(calib):
        if i >= max_batches:
            break
        if isinstance(batch, torch.Tensor):
            out.append((batch, None))
        else:
            out.append((batch[0], batch[1] if len(batch) > 1 else None))
    if not out:
        raise RelucompError("the calibration data is empty", "pass at least one batch")
    return out


def _taylor_grads(gm: fx.GraphModule, calib) -> dict[str, torch.Tensor]:
    """Gradients of the CE loss summed over the calibration batches (eval mode: BN statistics untouched)."""
    params = dict(gm.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    was = gm.training
    gm.eval()
    dev = next(iter(params.values())).device
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for x, y in _calib_batches(calib):
            x = x.to(dev)
            out = gm(x)
            if y is None:
                y = out.detach().argmax(1)
            loss = F.cross_entropy(out, y.to(dev))
            g = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), gi in zip(params.items(), g):
                if gi is not None:
                    grads[n] += gi.detach()
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        gm.train(was)
    return grads


@torch.no_grad()
def unit_importance(gm: fx.GraphModule, graph: ChannelGraph, importance: str | Callable = "l1",
                    calib=None) -> np.ndarray:
    """One score per unit (``inf`` for pinned units); see the module docstring."""
    n = len(graph.units)
    if callable(importance):
        scores = np.asarray(importance(gm, graph), dtype=np.float64).copy()
        if scores.shape != (n,):
            raise RelucompError(f"the importance function returned shape {scores.shape}, expected ({n},)",
                                "return one score per unit of the ChannelGraph")
    else:
        if importance not in IMPORTANCES:
            raise RelucompError(f"unknown pruning importance {importance!r}", f"use one of {', '.join(IMPORTANCES)}")
        grads = None
        with torch.enable_grad():
            if importance == "taylor":
                grads = _taylor_grads(gm, calib)
        scores = np.zeros(n)
        bn_scores = np.zeros(n)
        has_bn = np.zeros(n, dtype=bool)
        for site in graph.sites:
            mod = gm.get_submodule(site.target)
            units = site.out_units
            if site.role in ("conv", "dwconv", "linear"):
                w = mod.weight.detach()
                rows = w.reshape(w.shape[0], -1).double()
                if importance == "l2":
                    s = (rows ** 2).sum(1)
                elif importance == "taylor":
                    g = grads[f"{site.target}.weight"].reshape(w.shape[0], -1).double()
                    s = (rows * g).sum(1)
                    if mod.bias is not None:
                        s = s + mod.bias.detach().double() * grads[f"{site.target}.bias"].double()
                    s = s.abs()
                else:
                    s = rows.abs().sum(1)
                np.add.at(scores, units, s.cpu().numpy())
            elif site.role == "bn" and mod.weight is not None:
                if importance == "bn":
                    np.add.at(bn_scores, units, mod.weight.detach().abs().double().cpu().numpy())
                    has_bn[units] = True
                elif importance == "taylor":
                    s = mod.weight.detach().double() * grads[f"{site.target}.weight"].double()
                    if mod.bias is not None:
                        s = s + mod.bias.detach().double() * grads[f"{site.target}.bias"].double()
                    np.add.at(scores, units, s.abs().cpu().numpy())
        if importance == "l2":
            scores = np.sqrt(scores)
        if importance == "bn":
            scores = np.where(has_bn, bn_scores, scores)
    for u in graph.units:
        if u.pinned is not None:
            scores[u.index] = np.inf
    return scores


def _normalized(graph: ChannelGraph, scores: np.ndarray) -> np.ndarray:
    out = scores.copy()
    for g in graph.groups:
        pr = g.prunable(graph)
        if not pr:
            continue
        mean = float(np.mean(scores[pr]))
        if mean > 0 and np.isfinite(mean):
            out[pr] = scores[pr] / mean
    return out


# ---------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------

def _feasible(graph: ChannelGraph, order: Iterable[int], limit: int | None = None,
              kept: dict[int, int] | None = None) -> list[int]:
    """Greedy walk of ``order`` skipping units whose removal would empty a space."""
    kept = dict(kept) if kept is not None else {s.index: s.size for s in graph.spaces}
    out: list[int] = []
    for u in order:
        if limit is not None and len(out) >= limit:
            break
        m = graph.space_members(u)
        if all(kept[s] - c >= 1 for s, c in m.items()):
            for s, c in m.items():
                kept[s] -= c
            out.append(int(u))
    return out


def _order(units: list[int], scores: np.ndarray) -> list[int]:
    return sorted(units, key=lambda u: (scores[u], u))


def _uniform(graph: ChannelGraph, scores: np.ndarray, ratio: float) -> list[int]:
    chosen: list[int] = []
    kept = {s.index: s.size for s in graph.spaces}
    for g in graph.groups:
        pr = g.prunable(graph)
        k = int(math.floor(ratio * len(pr) + 1e-9))
        if k <= 0:
            continue
        sel = _feasible(graph, _order(pr, scores), limit=k, kept=kept)
        for u in sel:
            for s, c in graph.space_members(u).items():
                kept[s] -= c
        chosen += sel
    return chosen


def _round_up(graph: ChannelGraph, scores: np.ndarray, chosen: list[int], round_to: int | None) -> list[int]:
    """Give back the best-scored pruned units of each group until its kept width is a multiple of ``round_to``."""
    if not round_to or round_to <= 1 or not chosen:
        return chosen
    chosen_set = set(chosen)
    restore: set[int] = set()
    for g in graph.groups:
        pruned = [u for u in g.units if u in chosen_set]
        if not pruned:
            continue
        kept = len(g.units) - len(pruned)
        want = min(len(g.units), int(math.ceil(kept / round_to)) * round_to)
        if want > kept:
            restore.update(sorted(pruned, key=lambda u: (-scores[u], u))[: want - kept])
    return [u for u in chosen if u not in restore]


def select_units(graph: ChannelGraph, scores: np.ndarray, *, ratio: float | None = None,
                 mac_target: int | None = None, scope: str = "global", round_to: int | None = None) -> list[int]:
    """Units to prune: a ``ratio`` of the prunable units, or the fewest that bring MACs ≤ ``mac_target``.

    ``round_to``: keep a multiple of this many channels in every group (rounding the kept width up
    for a ratio; the MAC-budget search applies the rounding inside, so the budget still holds) —
    vectorized CPU kernels and HE slot packing like widths that are multiples of 8 or 16.
    """
    if scope not in SCOPES:
        raise RelucompError(f"unknown pruning scope {scope!r}", f"use one of {', '.join(SCOPES)}")
    prunable = graph.prunable_units()

    def rnd(sel):
        return _round_up(graph, scores, sel, round_to)

    if ratio is not None:
        if scope == "uniform":
            return rnd(_uniform(graph, scores, ratio))
        k = int(math.floor(ratio * len(prunable) + 1e-9))
        return rnd(_feasible(graph, _order(prunable, _normalized(graph, scores)), limit=k))
    assert mac_target is not None
    if graph.cost()["macs"] <= mac_target:
        return []
    if scope == "uniform":
        lo, hi = 0.0, 1.0
        best = rnd(_uniform(graph, scores, hi))
        if graph.cost(best)["macs"] > mac_target:
            return best  # caller reports the shortfall
        for _ in range(40):
            mid = (lo + hi) / 2
            sel = rnd(_uniform(graph, scores, mid))
            if graph.cost(sel)["macs"] <= mac_target:
                hi, best = mid, sel
            else:
                lo = mid
        return best
    order = _feasible(graph, _order(prunable, _normalized(graph, scores)))
    lo, hi = 0, len(order)
    if graph.cost(rnd(order))["macs"] > mac_target:
        return rnd(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if graph.cost(rnd(order[:mid]))["macs"] <= mac_target:
            hi = mid
        else:
            lo = mid + 1
    return rnd(order[:lo])


# ---------------------------------------------------------------------------
# the high-level entry point
# ---------------------------------------------------------------------------

def _ensure_shapes(gm: fx.GraphModule, example: torch.Tensor | None) -> None:
    """(Re)run shape analysis so that ReLU counts reflect the current gate masks."""
    own_meta(gm)  # never write into metadata shared with a deep copy of gm
    if example is None:
        try:
            example = example_from_meta(gm)
        except RuntimeError:
            raise RelucompError("pruning needs the model's input shape",
                                "pass example=<input batch> (or calib) or run ShapeAnalysisPass first") from None
    ShapeAnalysisPass(example[:1]).call(gm)


def _module_params(gm: nn.Module) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in gm.named_modules()
            if any(True for _ in m.parameters(recurse=False))}


def model_costs(gm: fx.GraphModule) -> dict[str, Any]:
    """MACs, ReLUs (kept) and params of ``gm`` from its shape metadata, total and per conv/linear.

    ``params`` counts the model's weights, not the gates' ``alpha`` (which lowering removes)."""
    rows = layer_table(gm)
    params = _module_params(gm)
    layers = {r["name"]: {"kind": r["kind"], "shape": r["shape"], "macs": r["macs"], "params": params.get(r["name"], 0)}
              for r in rows if r["kind"] in ("conv", "linear")}
    weights = sum(n for name, n in params.items() if not isinstance(gm.get_submodule(name), ReLUGate))
    return {"macs": sum(r["macs"] for r in rows), "relus": sum(r["relus"] for r in rows),
            "relus_kept": sum(r["relus_kept"] for r in rows), "params": int(weights), "layers": layers}


def _example_input(gm: fx.GraphModule, calib) -> torch.Tensor | None:
    if calib is None:
        return None
    if isinstance(calib, torch.Tensor):
        return calib[:1]
    try:
        return _calib_batches(calib, 1)[0][0][:1]
    except Exception:  # noqa: BLE001
        return None


def prune(gm: fx.GraphModule, *, channel_ratio: float | None = None, mac_budget: int | str | None = None,
          importance: str | Callable = "l1", scope: str = "global", calib=None, steps: int | None = None,
          round_to: int | None = None, example: torch.Tensor | None = None) -> dict[str, Any]:
    """Prune channels of ``gm`` in place and return stats (``plan``, MACs/ReLUs/params before/after, per layer).

    ``channel_ratio``: fraction of the prunable (coupled) channels to remove;
    ``mac_budget``: MACs per image to reach (``200M``, ``5e8``... or a ``%`` of
    the current MACs).  Exactly one of the two.  ``calib`` feeds Taylor
    importance (``(x, y)``, ``x`` or a loader); ``steps`` rounds of
    prune → re-score (default 1 for a ratio, 3 for a MAC budget); ``round_to``
    keeps every group's width a multiple of it (see :func:`select_units`).
    """
    if (channel_ratio is None) == (mac_budget is None):
        raise RelucompError("give exactly one of channel_ratio (--prune-channels) and mac_budget (--mac-budget)",
                            "e.g. --prune-channels 0.5 or --mac-budget 200M")
    if scope not in SCOPES:
        raise RelucompError(f"unknown pruning scope {scope!r}", f"use one of {', '.join(SCOPES)}")
    if isinstance(importance, str) and importance not in IMPORTANCES:
        raise RelucompError(f"unknown pruning importance {importance!r}", f"use one of {', '.join(IMPORTANCES)}")
    if channel_ratio is not None and not 0.0 <= float(channel_ratio) < 1.0:
        raise RelucompError(f"channel ratio {channel_ratio} must be in [0, 1)", "give e.g. --prune-channels 0.5")
    if example is None and not any(n.op == "placeholder" and "shape" in n.meta.get("relucomp", {})
                                   for n in gm.graph.nodes):
        example = _example_input(gm, calib)
    _ensure_shapes(gm, example)
    steps = int(steps) if steps else (1 if channel_ratio is not None else 3)
    if steps < 1:
        raise RelucompError(f"steps {steps} must be ≥ 1", "give steps=1 for one-shot pruning")

    before = model_costs(gm)
    graph = analyze_channels(gm)
    summary = graph.summary()
    n_prunable0 = len(graph.prunable_units())
    target = None
    if mac_budget is not None:
        target = parse_count(mac_budget, total=before["macs"], what="MAC budget")
        if target <= 0:
            raise BudgetError(f"MAC budget {target} must be positive", "give e.g. --mac-budget 200M")
        floor_cost = graph.cost(_feasible(graph, graph.prunable_units()))["macs"]
        if target < floor_cost:
            raise BudgetError(f"MAC budget {target:,} is below the {floor_cost:,} MACs left after pruning every "
                              f"prunable channel (model: {before['macs']:,} MACs)",
                              f"give a MAC budget ≥ {floor_cost:,}, or use a smaller architecture")
    plan: dict[str, set[int]] = {}
    rounds = []
    cur_macs = before["macs"]
    for step in range(1, steps + 1):
        graph = graph if step == 1 else analyze_channels(gm)
        scores = unit_importance(gm, graph, importance, calib)
        if channel_ratio is not None:
            r = float(channel_ratio) if steps == 1 else 1.0 - (1.0 - float(channel_ratio)) ** (1.0 / steps)
            units = select_units(graph, scores, ratio=r, scope=scope, round_to=round_to)
        else:
            step_target = int(math.ceil(cur_macs * (target / cur_macs) ** (1.0 / (steps - step + 1)))) \
                if cur_macs > target else target
            step_target = max(step_target, target)
            units = select_units(graph, scores, mac_target=step_target, scope=scope, round_to=round_to)
        if not units:
            rounds.append({"step": step, "pruned_units": 0, "macs": cur_macs})
            continue
        step_plan = plan_from_units(gm, graph, units)
        res = ChannelPrunePass(step_plan)(gm)
        for k, v in step_plan.items():
            plan.setdefault(k, set()).update(v)
        cur_macs = res.stats["macs"]["after"]
        rounds.append({"step": step, "pruned_units": len(units), "macs": cur_macs})
    after = model_costs(gm)
    if target is not None and after["macs"] > target:
        raise BudgetError(f"could not reach the MAC budget {target:,} (at {after['macs']:,} MACs)",
                          "raise the MAC budget")
    per_layer = []
    for name, b in before["layers"].items():
        a = after["layers"].get(name, {"shape": [], "macs": 0, "params": 0})
        per_layer.append({"name": name, "kind": b["kind"], "shape_before": b["shape"], "shape_after": a["shape"],
                          "macs_before": b["macs"], "macs_after": a["macs"],
                          "params_before": b["params"], "params_after": a["params"]})
    pruned_units = sum(r["pruned_units"] for r in rounds)
    return {
        "importance": importance if isinstance(importance, str) else getattr(importance, "__name__", "custom"),
        "scope": scope, "steps": steps, "round_to": round_to, "channel_ratio": channel_ratio, "mac_budget": target,
        "prunable_units": n_prunable0, "pruned_units": pruned_units,
        "groups": summary["prunable_groups"], "pinned": summary["pinned"], "rounds": rounds,
        "macs": {"before": before["macs"], "after": after["macs"]},
        "relus": {"before": before["relus_kept"], "after": after["relus_kept"]},
        "params": {"before": before["params"], "after": after["params"]},
        "per_layer": per_layer,
        "plan": {k: sorted(v) for k, v in sorted(plan.items())},
    }


# ---------------------------------------------------------------------------
# GMP
# ---------------------------------------------------------------------------

def make_gmp(model: nn.Module, *, sparsity: float, total_steps: int, scope: str = "layer",
             end_fraction: float = 0.75, updates: int = 10) -> GMP:
    """A :class:`GMP` for a finetune of ``total_steps`` optimizer steps: cubic ramp over the first
    ``end_fraction`` of them, masks recomputed ``updates`` times, kept for the rest."""
    end = max(1, int(end_fraction * total_steps))
    return GMP(model, sparsity=sparsity, begin_step=0, end_step=end, frequency=max(1, end // max(1, updates)),
               scope=scope)


def chain_steps(*fns: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """One ``after_step`` callable running ``fns`` (None entries skipped) in order; None if all are None."""
    fns = tuple(f for f in fns if f is not None)
    if not fns:
        return None
    if len(fns) == 1:
        return fns[0]

    def after_step(step: int) -> None:
        for f in fns:
            f(step)

    return after_step


def pruning_plan_of(stats: Mapping[str, Any] | None) -> dict[str, list[int]] | None:
    """The replayable plan from :func:`prune`'s stats (``None`` when nothing was pruned)."""
    if stats and "channels" in stats:  # compile_hook's report
        stats = stats["channels"]
    if not stats or not stats.get("plan"):
        return None
    return {k: list(v) for k, v in stats["plan"].items()}


# ---------------------------------------------------------------------------
# relucomp.compile integration
# ---------------------------------------------------------------------------

def compile_hook(gm: fx.GraphModule, *, prune_channels: float | None = None, mac_budget: int | str | None = None,
                 sparsity: float | None = None, importance: str = "l1", scope: str = "global", calib=None,
                 finetune_steps: int = 0, relu_budget: int | None = None, resume_plan: Mapping | None = None,
                 log: Callable[[str], None] | None = None) -> tuple[dict[str, Any] | None, GMP | None]:
    """What ``relucomp.compile`` runs at its pruning hook (gated graph, hard masks, before finetuning).

    Returns ``(report, gmp)``: the report goes under ``report["pruning"]``;
    ``gmp`` (or None) is the finetune's ``after_step`` and must be
    :meth:`GMP.bake`-d after it (its stats go under ``report["pruning"]["sparsity"]``).
    With ``resume_plan`` (a finetune checkpoint) the channels are already gone:
    the plan is kept, nothing is re-ranked.
    """
    from .passes.insert_gates import gates_of
    from .passes.snl_search import hard_count

    say = log or (lambda s: None)
    if prune_channels is None and mac_budget is None and sparsity is None and not resume_plan:
        return None, None
    if sparsity is not None and not 0.0 < float(sparsity) < 1.0:
        raise RelucompError(f"sparsity {sparsity} must be in (0, 1)", "give e.g. --sparsity 0.9")
    report: dict[str, Any] = {"options": {"prune_channels": prune_channels, "mac_budget": mac_budget,
                                          "sparsity": sparsity, "importance": importance, "scope": scope}}
    relus_before = hard_count(gates_of(gm).values())
    if resume_plan:
        apply_plan(gm, resume_plan)  # already applied before the checkpoint was loaded: a no-op
        report["channels"] = {"plan": {k: list(v) for k, v in resume_plan.items()}, "resumed": True}
    elif prune_channels is not None or mac_budget is not None:
        stats = prune(gm, channel_ratio=prune_channels, mac_budget=mac_budget, importance=importance,
                      scope=scope, calib=calib if importance == "taylor" else None)
        report["channels"] = stats
        say(f"pruned {stats['pruned_units']:,} of {stats['prunable_units']:,} coupled channels: "
            f"{stats['macs']['before']:,} -> {stats['macs']['after']:,} MACs, "
            f"{stats['params']['before']:,} -> {stats['params']['after']:,} params")
    relus_after = hard_count(gates_of(gm).values())
    if relus_after > relus_before or (relu_budget is not None and relus_after > relu_budget):
        raise RuntimeError(f"channel pruning raised the kept ReLUs ({relus_before} -> {relus_after}); this is a bug")
    report["relus_kept"] = {"before": relus_before, "after": relus_after}
    gmp = None
    if sparsity is not None:
        if finetune_steps > 0:
            gmp = make_gmp(gm, sparsity=float(sparsity), total_steps=finetune_steps)
            report["gmp"] = {"target": float(sparsity), "end_step": gmp.end, "frequency": gmp.frequency}
            say(f"gradual magnitude pruning to {100 * float(sparsity):.0f}% weight sparsity during finetuning")
        else:
            res = MagnitudePrunePass(float(sparsity))(gm)
            report["sparsity"] = {"target": float(sparsity), "achieved": res.stats["sparsity"], "one_shot": True}
    return report, gmp


def check_options(gm_dense: fx.GraphModule, *, prune_channels: float | None = None,
                  mac_budget: int | str | None = None, sparsity: float | None = None,
                  importance: str = "l1") -> int | None:
    """Validate the pruning options up front (before any training); return the MAC budget as a count.

    ``gm_dense`` is the traced, shape-analysed dense model.  Raises
    :class:`RelucompError` / :class:`BudgetError` with the fix spelled out.
    """
    if prune_channels is None and mac_budget is None and sparsity is None:
        return None
    if prune_channels is not None and mac_budget is not None:
        raise RelucompError("give one of --prune-channels and --mac-budget, not both",
                            "e.g. --prune-channels 0.5 or --mac-budget 200M")
    if prune_channels is not None and not 0.0 <= float(prune_channels) < 1.0:
        raise RelucompError(f"--prune-channels {prune_channels} must be in [0, 1)", "give e.g. --prune-channels 0.5")
    if sparsity is not None and not 0.0 < float(sparsity) < 1.0:
        raise RelucompError(f"--sparsity {sparsity} must be in (0, 1)", "give e.g. --sparsity 0.9")
    if importance not in IMPORTANCES:
        raise RelucompError(f"unknown pruning importance {importance!r}", f"use one of {', '.join(IMPORTANCES)}")
    if prune_channels is None and mac_budget is None:
        return None
    graph = analyze_channels(gm_dense)
    if not graph.prunable_units():
        raise RelucompError("the model has no channels relucomp can prune (all are tied to unsupported ops, "
                            "the input or the output)", "see docs/design-pruning.md for the supported ops")
    if mac_budget is None:
        return None
    total = graph.cost()["macs"]
    target = parse_count(mac_budget, total=total, what="MAC budget")
    floor_cost = graph.cost(_feasible(graph, graph.prunable_units()))["macs"]
    if target <= 0 or target < floor_cost:
        raise BudgetError(f"MAC budget {target:,} is below the {floor_cost:,} MACs left after pruning every "
                          f"prunable channel (model: {total:,} MACs)",
                          f"give a MAC budget ≥ {floor_cost:,}, or use a smaller architecture")
    return target

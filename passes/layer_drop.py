"""LayerDropSearchPass: a cheap layer-wise baseline in the spirit of DeepReDuce.

DeepReDuce (Jha et al., ICML'21) removes whole ReLU layers, keeping the ones
that matter most.  Here the criticality of a ReLU site is the accuracy lost on
a calibration set when that site alone is linearized (all other ReLUs kept).
Sites are then kept in decreasing criticality while their ReLUs fit in the
budget (a knapsack greedy, never above the budget); every other site becomes
linear.  No training happens here: follow with :class:`FinetunePass`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import fx

from relucomp.infra import Pass, PassResult
from relucomp.passes.insert_gates import gates_of


@torch.no_grad()
def _accuracy(gm, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((gm(x).argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)


class LayerDropSearchPass(Pass):
    preserves_semantics = False

    def __init__(self, *, budget: int, calib_loader: Iterable, max_batches: int = 4, device: str = "cpu"):
        self.budget = int(budget)
        self.loader = calib_loader
        self.max_batches = max_batches
        self.device = device

    def call(self, gm: fx.GraphModule) -> PassResult:
        gates = gates_of(gm)
        if not gates or all(bool(g.hard) for g in gates.values()):
            return PassResult(gm, False, {"reason": "no soft gates"})
        batches = []
        for i, b in enumerate(self.loader):
            if i >= self.max_batches:
                break
            batches.append((b[0].to(self.device), b[1].to(self.device)))
        was = gm.training
        gm.eval()
        for g in gates.values():
            g.set_mask(torch.ones_like(g.mask))
        base = _accuracy(gm, batches)
        crit: dict[str, float] = {}
        for site, g in gates.items():
            g.mask.zero_()
            crit[site] = base - _accuracy(gm, batches)
            g.mask.fill_(1.0)
        remaining = self.budget
        kept_sites = []
        for site in sorted(gates, key=lambda s: (-crit[s], list(gates).index(s))):
            g = gates[site]
            if g.total_relus <= remaining:
                kept_sites.append(site)
                remaining -= g.total_relus
        for site, g in gates.items():
            g.set_mask(torch.ones_like(g.mask) if site in kept_sites else torch.zeros_like(g.mask))
        gm.train(was)
        kept = self.budget - remaining
        return PassResult(gm, True, {"budget": self.budget, "hard_relus": kept, "base_acc": base,
                                     "criticality": crit, "kept_sites": kept_sites})

"""Unstructured magnitude pruning: one-shot (:class:`MagnitudePrunePass`) and gradual (:class:`GMP`).

Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune")
raises the sparsity of the conv/linear weights from ``s_i`` to ``s_f`` along
the cubic schedule::

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n Δt))^3,   t ∈ {t0, t0 + Δt, ..., t0 + n Δt}

(``t0 = begin``, ``t0 + nΔt = end``, ``Δt = frequency``; 0 before ``begin``,
``s_f`` from ``end`` on).  At each pruning step the smallest-magnitude weights
(per layer — ``scope="layer"``, as in the paper — or over all layers,
``scope="global"``) are masked; masks only grow (a pruned weight stays
pruned).  During finetuning the masks are re-applied after every optimizer
step (``GMP`` is the ``after_step`` callable of :class:`FinetunePass`), so
momentum and weight decay cannot revive a pruned weight.  :meth:`GMP.bake`
reaches the final sparsity and multiplies the masks into the weights, leaving
plain tensors: what is exported is the pruned weights, nothing else (ONNX
stores them dense; the zeros are what a sparse PI backend skips).

Only ``weight`` tensors of ``Conv{1,2,3}d`` and ``Linear`` are pruned (not
biases, BatchNorm or gate parameters).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import fx, nn

from relucomp.errors import RelucompError
from relucomp.infra import Pass, PassResult

SCOPES = ("layer", "global")
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def cubic_sparsity(step: int, *, final: float, end: int, begin: int = 0, frequency: int = 1,
                   initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic sparsity schedule at optimizer step ``step``."""
    if not 0.0 <= initial <= final < 1.0:
        raise ValueError(f"need 0 <= initial ({initial}) <= final ({final}) < 1")
    if step < begin:
        return 0.0
    if step >= end or end <= begin:
        return float(final)
    frequency = max(1, int(frequency))
    t = begin + ((step - begin) // frequency) * frequency
    frac = (t - begin) / (end - begin)
    return float(final + (initial - final) * (1.0 - frac) ** 3)


def prunable_weights(model: nn.Module, *, skip: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """``{module path: weight}`` of every conv/linear not named in ``skip``."""
    skip = set(skip)
    return {name: m.weight for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and name not in skip and m.weight is not None}


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float, *, scope: str = "layer",
                    previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Boolean keep-masks zeroing the ``sparsity`` fraction of smallest |w| (per layer or globally).

    Weights already masked in ``previous`` rank first, so masks only grow.
    """
    if scope not in SCOPES:
        raise RelucompError(f"unknown sparsity scope {scope!r}", f"use one of {', '.join(SCOPES)}")
    if not 0.0 <= sparsity < 1.0:
        raise RelucompError(f"sparsity {sparsity} must be in [0, 1)", "give e.g. --sparsity 0.9")

    def score(name, w):
        s = w.detach().abs().flatten().to(torch.float64)
        if previous is not None and name in previous:
            s = torch.where(previous[name].flatten().to(s.device), s, torch.full_like(s, -1.0))
        return s

    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, w in weights.items():
            s = score(name, w)
            k = int(sparsity * s.numel())
            keep = torch.ones(s.numel(), dtype=torch.bool, device=s.device)
            if k > 0:
                keep[torch.argsort(s, stable=True)[:k]] = False
            masks[name] = keep.reshape(w.shape)
        return masks
    scores = [score(n, w) for n, w in weights.items()]
    allv = torch.cat([s.cpu() for s in scores]) if scores else torch.zeros(0, dtype=torch.float64)
    k = int(sparsity * allv.numel())
    keep = torch.ones(allv.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.argsort(allv, stable=True)[:k]] = False
    off = 0
    for (name, w), s in zip(weights.items(), scores):
        masks[name] = keep[off: off + s.numel()].reshape(w.shape).to(w.device)
        off += s.numel()
    return masks


def weight_sparsity(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Fraction of exact zeros per layer and over all ``weights``."""
    per = {n: float((w == 0).sum()) / max(1, w.numel()) for n, w in weights.items()}
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    return {"total": zeros / max(1, total), "zeros": zeros, "weights": total, "per_layer": per}


class MagnitudePrunePass(Pass):
    """One-shot magnitude pruning of conv/linear weights to ``sparsity`` (no finetuning)."""

    preserves_semantics = False

    def __init__(self, sparsity: float, *, scope: str = "layer", skip: Iterable[str] = ()):
        self.sparsity, self.scope, self.skip = float(sparsity), scope, tuple(skip)

    @torch.no_grad()
    def call(self, gm: fx.GraphModule) -> PassResult:
        weights = prunable_weights(gm, skip=self.skip)
        prev = {n: w != 0 for n, w in weights.items()}
        masks = magnitude_masks(weights, self.sparsity, scope=self.scope, previous=prev)
        changed = 0
        for n, w in weights.items():
            newly = int((prev[n] & ~masks[n]).sum())
            if newly:
                w.mul_(masks[n].to(w.dtype))
                changed += newly
        return PassResult(gm, changed > 0, {"zeroed": changed, "sparsity": weight_sparsity(weights)["total"]})


class GMP:
    """Gradual magnitude pruning driven by optimizer steps (use as ``after_step``)."""

    def __init__(self, model: nn.Module, *, sparsity: float, end_step: int, begin_step: int = 0,
                 frequency: int | None = None, initial_sparsity: float = 0.0, scope: str = "layer",
                 skip: Iterable[str] = ()):
        if not 0.0 < float(sparsity) < 1.0:
            raise RelucompError(f"sparsity {sparsity} must be in (0, 1)", "give e.g. --sparsity 0.9")
        if scope not in SCOPES:
            raise RelucompError(f"unknown sparsity scope {scope!r}", f"use one of {', '.join(SCOPES)}")
        self.final = float(sparsity)
        self.initial = float(initial_sparsity)
        self.begin, self.end = int(begin_step), max(int(begin_step), int(end_step))
        self.frequency = int(frequency) if frequency else max(1, (self.end - self.begin) // 10)
        self.scope = scope
        self.weights = prunable_weights(model, skip=skip)
        if not self.weights:
            raise RelucompError("the model has no conv/linear weights to prune", "GMP prunes Conv/Linear weights")
        self.masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()}
        self.current = 0.0
        self.history: list[tuple[int, float]] = []

    def target(self, step: int) -> float:
        return cubic_sparsity(step, final=self.final, initial=self.initial, begin=self.begin, end=self.end,
                              frequency=self.frequency)

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Recompute the masks if the schedule's sparsity rose at ``step``."""
        s = self.target(step)
        if s <= self.current:
            return False
        self.masks = magnitude_masks(self.weights, s, scope=self.scope, previous=self.masks)
        self.current = s
        self.history.append((int(step), round(s, 6)))
        return True

    @torch.no_grad()
    def apply(self) -> None:
        for n, w in self.weights.items():
            m = self.masks[n]
            if m.device != w.device:
                m = self.masks[n] = m.to(w.device)
            w.mul_(m.to(w.dtype))

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Apply the current masks to another copy of the model (e.g. an EMA of the weights)."""
        mods = dict(model.named_modules())
        for n, m in self.masks.items():
            if n in mods:
                w = mods[n].weight
                w.mul_(m.to(device=w.device, dtype=w.dtype))

    def __call__(self, step: int) -> None:
        self.update(step)
        self.apply()

    @torch.no_grad()
    def bake(self) -> dict[str, Any]:
        """Reach the final sparsity, write the masks into the weights, return the achieved sparsity."""
        self.update(max(self.end, self.begin))
        self.apply()
        stats = weight_sparsity(self.weights)
        return {"target": self.final, "achieved": stats["total"], "zeros": stats["zeros"],
                "weights": stats["weights"], "scope": self.scope, "schedule": list(self.history),
                "begin_step": self.begin, "end_step": self.end, "frequency": self.frequency,
                "per_layer": {k: round(v, 4) for k, v in stats["per_layer"].items()}}

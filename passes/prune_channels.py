"""ChannelPrunePass: remove coupled channels from the modules (the mechanism).

Input: a *plan* ``{space key: [original channel ids]}`` — the key is the module
path of a conv/linear that opens a channel space (see
:mod:`relucomp.passes.prune_analysis`), the ids are that module's output
channels numbered as in the unpruned model.  Each named channel is closed
under coupling: its whole unit (the same channel of every block of a residual
stage, the matching BatchNorm/gate entries, the linear-head features...) is
removed.  Which channels to name is the policy's job (:mod:`relucomp.pruning`).

Per-op slicing (``keep``: the positions that stay, in order):

* ``Conv`` (groups = 1): ``W ← W[keep_out][:, keep_in]``, ``b ← b[keep_out]``;
* depthwise ``Conv`` (groups = in = out): ``W ← W[keep]``, ``b ← b[keep]``,
  ``groups = in = out = len(keep)``;
* ``Linear``: ``W ← W[keep_out][:, keep_in]`` — after ``flatten`` of
  ``C×H×W`` the input positions of a channel are a block of ``H·W`` features;
* ``BatchNorm``: ``γ, β, μ, σ²`` sliced;
* :class:`~relucomp.nn.ReLUGate`: ``alpha`` and ``mask`` sliced along the
  channel axis (per-pixel and per-channel gates; a per-layer gate keeps its
  single entry), ``act_shape`` updated.

Exactness: a channel whose value is identically 0 wherever it is read (its
producer rows, biases and BatchNorm ``γ, β`` are zero) contributes nothing
through any consumer column, so removing it leaves the outputs unchanged —
the test suite checks this on every topology.  In general pruning changes the
function (``preserves_semantics = False``) and finetuning follows.

Original channel ids are kept on each producer module (attribute
``relucomp_channel_ids``), so applying the same plan twice is a no-op
(``modified = False``) and a plan replays on a freshly traced model
(:func:`apply_plan`, used by ``load_compiled``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import fx, nn

from relucomp.errors import RelucompError
from relucomp.infra import Pass, PassResult
from relucomp.nn import ReLUGate
from relucomp.passes.prune_analysis import ChannelGraph, analyze_channels

IDS_ATTR = "relucomp_channel_ids"


# ---------------------------------------------------------------------------
# per-op slicing functions
# ---------------------------------------------------------------------------

def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _idx(keep, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(keep, dtype=np.int64), device=device)


@torch.no_grad()
def slice_conv(conv: nn.Module, in_keep, out_keep) -> None:
    w = conv.weight
    new = w[_idx(out_keep, w.device)][:, _idx(in_keep, w.device)]
    conv.weight = _param(new, w)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[_idx(out_keep, w.device)], conv.bias)
    conv.out_channels, conv.in_channels = int(new.shape[0]), int(new.shape[1]) * conv.groups


@torch.no_grad()
def slice_dwconv(conv: nn.Module, in_keep, out_keep) -> None:
    w = conv.weight
    keep = _idx(out_keep, w.device)
    conv.weight = _param(w[keep], w)
    if conv.bias is not None:
        conv.bias = _param(conv.bias[keep], conv.bias)
    conv.in_channels = conv.out_channels = conv.groups = int(keep.numel())


@torch.no_grad()
def slice_linear(lin: nn.Linear, in_keep, out_keep) -> None:
    w = lin.weight
    new = w[_idx(out_keep, w.device)][:, _idx(in_keep, w.device)]
    lin.weight = _param(new, w)
    if lin.bias is not None:
        lin.bias = _param(lin.bias[_idx(out_keep, w.device)], lin.bias)
    lin.out_features, lin.in_features = int(new.shape[0]), int(new.shape[1])


@torch.no_grad()
def slice_bn(bn: nn.modules.batchnorm._BatchNorm, in_keep, out_keep) -> None:
    dev = bn.running_mean.device if bn.running_mean is not None else (bn.weight.device if bn.weight is not None else "cpu")
    keep = _idx(out_keep, dev)
    if bn.weight is not None:
        bn.weight = _param(bn.weight[keep], bn.weight)
    if bn.bias is not None:
        bn.bias = _param(bn.bias[keep], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = int(keep.numel())


@torch.no_grad()
def slice_gate(gate: ReLUGate, in_keep, out_keep) -> None:
    keep = _idx(out_keep, gate.alpha.device)
    if gate.alpha.shape[1] == gate.act_shape[0]:  # per-pixel / per-channel entries (a layer gate has 1)
        gate.alpha = _param(gate.alpha.index_select(1, keep), gate.alpha)
        gate.mask = gate.mask.index_select(1, keep).clone()
    for name in ("rep_scale", "rep_shift"):  # per-channel linear replacement
        p = getattr(gate, name, None)
        if p is not None and p.shape[1] == gate.act_shape[0]:
            setattr(gate, name, _param(p.index_select(1, keep), p))
    gate.act_shape = (int(keep.numel()), *gate.act_shape[1:])


#: role (from the analysis) -> slicing function ``f(module, in_keep, out_keep)``
SLICERS: dict[str, Callable[[nn.Module, Any, Any], None]] = {
    "conv": slice_conv,
    "dwconv": slice_dwconv,
    "linear": slice_linear,
    "bn": slice_bn,
    "gate": slice_gate,
}


# ---------------------------------------------------------------------------
# plan <-> units
# ---------------------------------------------------------------------------

def channel_ids(mod: nn.Module, size: int) -> list[int]:
    """Original ids of ``mod``'s current output channels."""
    ids = getattr(mod, IDS_ATTR, None)
    return list(ids) if ids is not None else list(range(size))


def plan_from_units(gm: fx.GraphModule, graph: ChannelGraph, units: Iterable[int]) -> dict[str, list[int]]:
    """The plan (original ids per producer module) that removes ``units``."""
    plan: dict[str, set[int]] = {}
    for u in units:
        for s, p in graph.units[int(u)].members:
            sp = graph.spaces[s]
            if sp.kind not in ("conv", "linear"):
                continue
            ids = channel_ids(gm.get_submodule(sp.key), sp.size)
            plan.setdefault(sp.key, set()).add(int(ids[p]))
    return {k: sorted(v) for k, v in sorted(plan.items())}


def units_from_plan(gm: fx.GraphModule, graph: ChannelGraph, plan: Mapping[str, Iterable[int]]) -> tuple[set[int], int]:
    """Units named by ``plan`` that are still present, and how many named channels are already gone."""
    units: set[int] = set()
    gone = 0
    for key, wanted in plan.items():
        try:
            sp = graph.space(key)
        except KeyError:
            raise RelucompError(f"the pruning plan names {key!r}, which is not a prunable conv/linear of this model",
                                "use a plan made for this architecture") from None
        pos = {cid: p for p, cid in enumerate(channel_ids(gm.get_submodule(key), sp.size))}
        for cid in wanted:
            if int(cid) in pos:
                units.add(graph.unit_of(sp.index, pos[int(cid)]))
            else:
                gone += 1
    return units, gone


def check_units(graph: ChannelGraph, units: Iterable[int]) -> None:
    """Raise :class:`RelucompError` if ``units`` hold a pinned channel or empty a space."""
    units = set(int(u) for u in units)
    for u in sorted(units):
        why = graph.units[u].pinned
        if why is not None:
            sp = graph.spaces[graph.units[u].members[0][0]]
            raise RelucompError(f"channel {graph.units[u].members[0][1]} of {sp.key!r} cannot be pruned: it is tied to {why}",
                                "prune only channels the analysis marks prunable (ChannelGraph.prunable_units())")
    removed: Counter = Counter()
    for u in units:
        removed.update(graph.space_members(u))
    for s, n in removed.items():
        sp = graph.spaces[s]
        if n >= sp.size:
            raise RelucompError(f"pruning would remove all {sp.size} channels of {sp.key!r} (group of "
                                f"{len(graph.groups[graph.units[graph.unit_of(s, 0)].group].units)} coupled channels)",
                                "keep at least one channel per layer: lower the ratio or raise the MAC budget")


def example_from_meta(gm: fx.GraphModule) -> torch.Tensor:
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            shape = n.meta.get("relucomp", {}).get("shape")
            if shape is None:
                break
            p = next(iter(gm.parameters()), None)
            return torch.zeros(1, *shape, device=p.device if p is not None else "cpu")
    raise RuntimeError("ChannelPrunePass needs ShapeAnalysisPass metadata on the input placeholder")


@torch.no_grad()
def prune_units(gm: fx.GraphModule, graph: ChannelGraph, units: Iterable[int]) -> dict[str, Any]:
    """Slice every module so that ``units`` disappear (checked first); return per-module counts."""
    units = set(int(u) for u in units)
    check_units(graph, units)
    pruned = graph.pruned_mask(units)
    changed: dict[str, list[int]] = {}
    for sp in graph.spaces:  # record surviving original ids on producers
        if sp.kind not in ("conv", "linear"):
            continue
        pos = [p for p in range(sp.size) if not pruned[graph.unit_of(sp.index, p)]]
        if len(pos) < sp.size:
            mod = gm.get_submodule(sp.key)
            ids = channel_ids(mod, sp.size)
            setattr(mod, IDS_ATTR, [ids[p] for p in pos])
    for site in graph.sites:
        in_keep = None if site.in_units is None else np.nonzero(~pruned[site.in_units])[0]
        out_keep = None if site.out_units is None else np.nonzero(~pruned[site.out_units])[0]
        if (in_keep is None or len(in_keep) == len(site.in_units)) and (
                out_keep is None or len(out_keep) == len(site.out_units)):
            continue
        mod = gm.get_submodule(site.target)
        if in_keep is None:
            in_keep = np.arange(len(site.out_units))
        if out_keep is None:
            out_keep = np.arange(len(site.in_units))
        SLICERS[site.role](mod, in_keep, out_keep)
        changed[site.target] = [len(site.out_units) - len(out_keep), len(site.in_units) - len(in_keep)]
    return changed


class ChannelPrunePass(Pass):
    """Remove the channels named by ``plan`` (closed under coupling); see the module docstring."""

    preserves_semantics = False

    def __init__(self, plan: Mapping[str, Iterable[int]]):
        self.plan = {str(k): [int(i) for i in v] for k, v in plan.items()}

    def call(self, gm: fx.GraphModule) -> PassResult:
        from relucomp.passes.shape_prop import ShapeAnalysisPass

        graph = analyze_channels(gm)  # (also un-shares node metadata from deep copies)
        units, gone = units_from_plan(gm, graph, self.plan)
        if not units:
            return PassResult(gm, False, {"pruned_units": 0, "already_pruned": gone})
        before = graph.cost()
        changed = prune_units(gm, graph, units)
        ShapeAnalysisPass(example_from_meta(gm)).call(gm)
        after = analyze_channels(gm).cost()
        return PassResult(gm, True, {"pruned_units": len(units), "already_pruned": gone,
                                     "modules": changed, "macs": {"before": before["macs"], "after": after["macs"]},
                                     "relus": {"before": before["relus"], "after": after["relus"]}})


def apply_plan(gm: fx.GraphModule, plan: Mapping[str, Iterable[int]]) -> PassResult:
    """Run :class:`ChannelPrunePass` (lint + recompile); a no-op when ``plan`` is empty or already applied."""
    return ChannelPrunePass(plan)(gm)

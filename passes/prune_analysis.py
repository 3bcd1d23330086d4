"""ChannelDependencyPass: which channels must be pruned together (analysis only).

Removing output channel ``c`` of a conv is only legal if every tensor that
carries channel ``c`` loses it too, and every op reading such a tensor is
sliced consistently.  The pass computes these *coupled channels* on the fx
graph by union-find over channel *elements*:

* every producer of new channels — a ``Conv`` with ``groups == 1``, a
  ``Linear``, the model input, an op the pass does not understand — opens a
  fresh *channel space* of ``C`` elements (one per output channel);
* each node's output gets a *layout*: the element id carried by each position
  of its channel dimension (dim 1 of the batched tensor);
* channel-preserving ops (BatchNorm, ReLU, ReLUGate, pooling, dropout, a
  depthwise conv ``groups == in == out``...) pass the layout through;
* elementwise binary ops of equal channel count (residual ``a + b``, SE-style
  ``x * s``) *unify* their operands' layouts position by position — this is
  what ties every block of a ResNet stage into one group;
* ``cat(dim=1)`` concatenates layouts;  ``flatten(x, 1)`` of a ``C×H×W``
  tensor repeats each element ``H·W`` times, so the linear head that reads it
  loses a whole ``H×W`` block of input features per pruned channel (after a
  global average pool this is one feature per channel).

A *unit* is one union-find class: one coupled channel, pruned as a whole.  A
*group* is a connected set of spaces (the units that index the same coupled
dimension, e.g. the stem conv + every ``conv2`` of a ResNet stage).  Units
touching the model's input or output, an unsupported op (reshape to other
shapes, ``getitem``, grouped convs with ``1 < groups < C``, LayerNorm...), a
constant, or a module called from several places are *pinned* (never pruned),
with the reason recorded.  :class:`~relucomp.nn.SparseReLU` is refused with
an error: channel pruning runs on the gated graph, before lowering.

Output: :class:`ChannelGraph` (returned by :func:`analyze_channels` and kept on
the pass as ``.graph``) and, per node, ``meta["relucomp"]``:

``channel_units``  unit id of each channel position of the node's output
``channel_space``  the key (module path) of the channel space the node opens
``prune_role``     "conv" | "dwconv" | "linear" | "bn" | "gate" for the ops
                   the mechanism (:mod:`relucomp.passes.prune_channels`) slices

It also gives the cost model the policy uses: MACs / ReLUs of the graph as a
function of the pruned units (:meth:`ChannelGraph.cost`), exact for conv,
linear, ReLU and gate nodes.  Requires ``ShapeAnalysisPass`` metadata (or an
``example`` input, with which the pass runs shape analysis itself).
"""

from __future__ import annotations

import math
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from networkx.utils import UnionFind
from torch import fx, nn

from relucomp.errors import RelucompError
from relucomp.infra import AnalysisPass
from relucomp.ir import META, is_canonical_relu, is_raw_relu, meta, module_of
from relucomp.nn import ReLUGate, SparseReLU

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: modules that keep channel ``c`` of the output a function of channel ``c`` of the input only
PASSTHROUGH_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)
PASSTHROUGH_FUNCTIONS = {
    torch.relu, F.relu, torch.sigmoid, torch.tanh, F.gelu, F.silu, F.relu6, F.hardtanh, F.leaky_relu, F.elu,
    F.hardswish, F.dropout, F.dropout2d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, torch.abs, torch.neg, operator.neg,
}
PASSTHROUGH_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to", "abs", "neg"}
BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
ROLES = ("conv", "dwconv", "linear", "bn", "gate")


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass
class Space:
    """A set of channels opened by one producer node."""

    index: int
    key: str                 # module path of the producer (node name for non-modules)
    node: str                # fx node name
    size: int
    kind: str                # "conv" | "linear" | "input" | "opaque"
    start: int               # first element id
    pinned: str | None = None


@dataclass
class Unit:
    """One coupled channel: its (space index, channel position) members."""

    index: int
    members: list[tuple[int, int]]
    group: int = -1
    pinned: str | None = None


@dataclass
class Group:
    index: int
    spaces: list[int]
    units: list[int]

    def prunable(self, graph: "ChannelGraph") -> list[int]:
        return [u for u in self.units if graph.units[u].pinned is None]


@dataclass
class Site:
    """A node whose module the mechanism slices (``role`` in :data:`ROLES`)."""

    node: str
    target: str
    role: str
    in_units: np.ndarray | None = None   # unit per input channel/feature position
    out_units: np.ndarray | None = None  # unit per output channel position (== in for pass-through roles)


@dataclass
class CostSite:
    """A conv/linear (MACs) or ReLU-like node (ReLUs) with its cost as a function of kept units."""

    node: str
    kind: str                        # "macs" | "relus"
    name: str
    out_units: np.ndarray | None     # None: fixed cost
    in_units: np.ndarray | None = None
    factor: float = 1.0              # macs per (kept out × kept in) pair, or fixed cost
    weights: np.ndarray | None = None  # relus: per output position


@dataclass
class ChannelGraph:
    spaces: list[Space]
    units: list[Unit]
    groups: list[Group]
    sites: list[Site]
    costs: list[CostSite]
    layouts: dict[str, np.ndarray] = field(default_factory=dict)   # node name -> unit per channel
    pin_reasons: dict[str, int] = field(default_factory=dict)

    # -- lookups --------------------------------------------------------------
    def space(self, key: str) -> Space:
        for s in self.spaces:
            if s.key == key:
                return s
        raise KeyError(key)

    def unit_of(self, space: int, position: int) -> int:
        return int(self._unit_of_elem[self.spaces[space].start + position])

    def prunable_units(self) -> list[int]:
        return [u.index for u in self.units if u.pinned is None]

    def space_members(self, unit: int) -> Counter:
        """How many channels of each space the unit holds."""
        return Counter(s for s, _ in self.units[unit].members)

    # -- cost model -----------------------------------------------------------
    def pruned_mask(self, units: Iterable[int]) -> np.ndarray:
        mask = np.zeros(len(self.units), dtype=bool)
        idx = np.fromiter((int(u) for u in units), dtype=np.int64)
        mask[idx] = True
        return mask

    def cost(self, pruned: Iterable[int] | np.ndarray = ()) -> dict[str, int]:
        """MACs and ReLUs per image if ``pruned`` (unit ids or a boolean mask) were removed."""
        mask = pruned if isinstance(pruned, np.ndarray) and pruned.dtype == bool else self.pruned_mask(pruned)
        keep = ~mask
        macs = 0.0
        relus = 0.0
        for c in self.costs:
            if c.kind == "macs":
                if c.out_units is None:
                    macs += c.factor
                    continue
                n_out = int(keep[c.out_units].sum())
                n_in = int(keep[c.in_units].sum()) if c.in_units is not None else 1
                macs += c.factor * n_out * n_in
            else:
                if c.out_units is None:
                    relus += c.factor
                else:
                    relus += float(c.weights[keep[c.out_units]].sum())
        return {"macs": int(round(macs)), "relus": int(round(relus))}

    def summary(self) -> dict[str, Any]:
        prunable = self.prunable_units()
        groups = [g for g in self.groups if g.prunable(self)]
        return {
            "spaces": len(self.spaces),
            "units": len(self.units),
            "prunable_units": len(prunable),
            "groups": len(self.groups),
            "prunable_groups": len(groups),
            "group_sizes": {self.spaces[g.spaces[0]].key: len(g.prunable(self)) for g in groups},
            "group_members": {self.spaces[g.spaces[0]].key: [self.spaces[s].key for s in g.spaces] for g in groups},
            "pinned": dict(self.pin_reasons),
            **self.cost(),
        }

    _unit_of_elem: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]


# ---------------------------------------------------------------------------
# the analysis
# ---------------------------------------------------------------------------

def _shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    s = node.meta.get("relucomp", {}).get("shape")
    return tuple(s) if s is not None else None


def _flat_nodes(args) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(args, lambda n: out.append(n))
    return out


def _norm_dim(dim: int, ndim_batched: int) -> int:
    return dim + ndim_batched if dim < 0 else dim


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.uf = UnionFind()
        self.n_elems = 0
        self.spaces: list[Space] = []
        self.layouts: dict[fx.Node, np.ndarray] = {}
        self.pinned: dict[int, str] = {}           # element -> reason
        self.sites: list[tuple[fx.Node, str, np.ndarray | None, np.ndarray | None]] = []
        self.costs: list[tuple] = []
        self.calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    # -- primitives -------------------------------------------------------------
    def fresh(self, node: fx.Node, size: int, kind: str, pinned: str | None = None, key: str | None = None) -> np.ndarray:
        start = self.n_elems
        self.n_elems += size
        sp = Space(len(self.spaces), key or node.name, node.name, size, kind, start, pinned)
        self.spaces.append(sp)
        elems = np.arange(start, start + size, dtype=np.int64)
        for e in elems.tolist():
            self.uf[e]  # register
        if pinned:
            for e in elems.tolist():
                self.pinned.setdefault(e, pinned)
        return elems

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self.uf.union(x, y)

    def pin(self, layout: np.ndarray | None, reason: str) -> None:
        if layout is None:
            return
        for e in layout.tolist():
            self.pinned.setdefault(e, reason)

    def opaque(self, node: fx.Node, reason: str) -> None:
        """An op the analysis does not understand: pin its inputs, open a pinned space for its output."""
        for a in _flat_nodes((node.args, node.kwargs)):
            self.pin(self.layouts.get(a), reason)
        shape = _shape(node)
        if shape:
            self.layouts[node] = self.fresh(node, int(shape[0]), "opaque", pinned=reason)

    # -- per op -------------------------------------------------------------------
    def visit(self, node: fx.Node) -> None:
        shape = _shape(node)
        if node.op == "placeholder":
            if shape:
                self.layouts[node] = self.fresh(node, int(shape[0]), "input", pinned="model input")
            return
        if node.op == "output":
            for a in _flat_nodes(node.args):
                self.pin(self.layouts.get(a), "model output")
            return
        if node.op == "get_attr":
            return  # constants: an op reading one (without a layout) becomes opaque below
        if node.op == "call_module":
            self.visit_module(node, shape)
            return
        if node.op == "call_function" and (is_canonical_relu(node) or node.target in PASSTHROUGH_FUNCTIONS):
            self.passthrough(node, shape)
            if is_canonical_relu(node) or is_raw_relu(self.gm, node):
                self.relu_cost(node, shape, None)
            return
        if node.op == "call_method" and node.target in PASSTHROUGH_METHODS:
            self.passthrough(node, shape)
            if node.target == "relu":
                self.relu_cost(node, shape, None)
            return
        if (node.op == "call_function" and node.target in BINARY_FUNCTIONS) or (
                node.op == "call_method" and node.target in BINARY_METHODS):
            self.binary(node, shape)
            return
        if node.op == "call_function" and node.target is torch.cat:
            self.cat(node, shape)
            return
        if node.op == "call_function" and node.target is torch.flatten or (
                node.op == "call_method" and node.target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self.flatten(node, shape, start, end)
            return
        if node.op == "call_method" and node.target in ("view", "reshape") or (
                node.op == "call_function" and node.target in (torch.reshape,)):
            src = node.args[0]
            ins = _shape(src)
            if ins is not None and shape is not None and shape == ins:
                self.passthrough(node, shape)
            elif ins is not None and shape is not None and len(shape) == 1 and shape[0] == math.prod(ins):
                self.flatten(node, shape, 1, -1)
            else:
                self.opaque(node, f"reshape {node.name}")
            return
        if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
            src = node.args[0]
            ins = _shape(src)
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is not None and ins is not None and shape and shape[0] == ins[0]:
                dims = [dims] if isinstance(dims, int) else list(dims)
                nd = len(ins) + 1
                if all(_norm_dim(d, nd) >= 2 for d in dims) and src in self.layouts:
                    self.layouts[node] = self.layouts[src]
                    return
            self.opaque(node, f"reduction {node.name}")
            return
        if shape is None and not any(a in self.layouts for a in _flat_nodes((node.args, node.kwargs))):
            return  # non-tensor bookkeeping (x.size(), getattr...)
        self.opaque(node, f"unsupported op {node.op}:{getattr(node.target, '__name__', node.target)}")

    def passthrough(self, node: fx.Node, shape) -> np.ndarray | None:
        src = node.args[0] if node.args else None
        lay = self.layouts.get(src) if isinstance(src, fx.Node) else None
        if lay is None or not shape or len(lay) != shape[0]:
            self.opaque(node, f"channel-changing op {node.name}")
            return None
        for a in _flat_nodes((node.args[1:], node.kwargs)):
            self.pin(self.layouts.get(a), f"side input of {node.name}")
        self.layouts[node] = lay
        return lay

    def binary(self, node: fx.Node, shape) -> None:
        operands = [a for a in list(node.args[:2]) + list(node.kwargs.values()) if isinstance(a, fx.Node)]
        if not shape:
            self.opaque(node, f"scalar op {node.name}")
            return
        couples, others = [], []
        for a in operands:
            lay, s = self.layouts.get(a), _shape(a)
            if lay is None and a.op != "get_attr" and not s:
                continue  # a Python scalar (x.size(1)...) or a 0-dim tensor: broadcasts, couples nothing
            if lay is None or s is None:
                self.opaque(node, f"operand without channel layout in {node.name}")
                return
            if len(s) == len(shape) and s[0] == shape[0]:
                couples.append(lay)
            elif len(s) == len(shape) and s[0] == 1:
                others.append(lay)   # broadcast over channels: no coupling, but keep it whole
            else:
                self.opaque(node, f"broadcasting op {node.name}")
                return
        if not couples:
            self.opaque(node, f"broadcasting op {node.name}")
            return
        for lay in couples[1:]:
            self.unify(couples[0], lay)
        for lay in others:
            self.pin(lay, f"broadcast operand of {node.name}")
        self.layouts[node] = couples[0]

    def cat(self, node: fx.Node, shape) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not shape:
            self.opaque(node, f"cat {node.name}")
            return
        lays = [self.layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
        if any(lay is None for lay in lays):
            self.opaque(node, f"cat of unknown tensors {node.name}")
            return
        d = _norm_dim(int(dim), len(shape) + 1)
        if d == 1:
            out = np.concatenate(lays)
            if len(out) != shape[0]:
                self.opaque(node, f"cat {node.name}")
                return
            self.layouts[node] = out
            return
        if any(len(lay) != shape[0] for lay in lays):
            self.opaque(node, f"cat {node.name}")
            return
        for lay in lays[1:]:
            self.unify(lays[0], lay)
        self.layouts[node] = lays[0]

    def flatten(self, node: fx.Node, shape, start, end) -> None:
        src = node.args[0]
        ins = _shape(src)
        lay = self.layouts.get(src)
        if lay is None or ins is None or not shape:
            self.opaque(node, f"flatten {node.name}")
            return
        nd = len(ins) + 1
        if _norm_dim(int(start), nd) != 1 or _norm_dim(int(end), nd) != nd - 1:
            self.opaque(node, f"flatten {node.name} not from dim 1 to the end")
            return
        per = math.prod(ins[1:]) if len(ins) > 1 else 1
        self.layouts[node] = np.repeat(lay, per)

    def visit_module(self, node: fx.Node, shape) -> None:
        mod = module_of(self.gm, node)
        src = node.args[0] if node.args else None
        lay = self.layouts.get(src) if isinstance(src, fx.Node) else None
        ins = _shape(src)
        has_state = any(True for _ in mod.parameters()) or any(True for _ in mod.buffers())
        shared = self.calls[node.target] > 1 and has_state
        if isinstance(mod, SparseReLU):
            raise RelucompError(
                f"channel pruning cannot slice the lowered SparseReLU {node.target!r}",
                "prune channels before lowering gates (on the gated graph: relucomp.compile does this), "
                "or on the dense model")
        if shared:
            self.opaque(node, f"module {node.target} called {self.calls[node.target]} times")
            self.cost_for_module(node, mod, shape, None, None)
            return
        if isinstance(mod, CONVS):
            if lay is None or len(lay) != mod.in_channels or not shape:
                self.opaque(node, f"conv {node.target} input layout unknown")
                self.cost_for_module(node, mod, shape, None, None)
                return
            if mod.groups == 1:
                out = self.fresh(node, mod.out_channels, "conv", key=str(node.target))
                self.layouts[node] = out
                self.sites.append((node, "conv", lay, out))
                self.cost_for_module(node, mod, shape, lay, out)
            elif mod.groups == mod.in_channels == mod.out_channels:
                self.layouts[node] = lay
                self.sites.append((node, "dwconv", lay, lay))
                self.cost_for_module(node, mod, shape, None, lay, depthwise=True)
            else:
                self.opaque(node, f"grouped conv {node.target} (groups={mod.groups})")
                self.cost_for_module(node, mod, shape, None, None)
            return
        if isinstance(mod, nn.Linear):
            if lay is None or ins is None or len(ins) != 1 or len(lay) != mod.in_features or not shape:
                self.opaque(node, f"linear {node.target} on a non-flat input")
                self.cost_for_module(node, mod, shape, None, None)
                return
            out = self.fresh(node, mod.out_features, "linear", key=str(node.target))
            self.layouts[node] = out
            self.sites.append((node, "linear", lay, out))
            self.cost_for_module(node, mod, shape, lay, out)
            return
        if isinstance(mod, BNS):
            if self.passthrough(node, shape) is not None and len(lay) == mod.num_features:
                self.sites.append((node, "bn", lay, lay))
            elif node in self.layouts:
                self.opaque(node, f"batchnorm {node.target} size mismatch")
            return
        if isinstance(mod, ReLUGate):
            if self.passthrough(node, shape) is not None:
                if mod.alpha.dim() < 2 or mod.alpha.shape[1] not in (1, len(lay)):
                    self.opaque(node, f"gate {node.target} with an unexpected shape")
                    return
                self.sites.append((node, "gate", lay, lay))
                self.relu_cost(node, shape, mod)
            return
        if isinstance(mod, PASSTHROUGH_MODULES):
            self.passthrough(node, shape)
            if isinstance(mod, nn.ReLU):
                self.relu_cost(node, shape, None)
            return
        if isinstance(mod, nn.Flatten):
            self.flatten(node, shape, mod.start_dim, mod.end_dim)
            return
        self.opaque(node, f"unsupported module {type(mod).__name__} ({node.target})")

    # -- cost model ---------------------------------------------------------------
    def cost_for_module(self, node, mod, shape, in_lay, out_lay, depthwise: bool = False) -> None:
        if not shape:
            return
        name = str(node.target)
        if isinstance(mod, CONVS):
            spatial = math.prod(shape[1:])
            k = math.prod(mod.kernel_size)
            if out_lay is None:
                self.costs.append(("macs", node, name, None, None, float(math.prod(shape) * (mod.in_channels // mod.groups) * k), None))
            elif depthwise:
                self.costs.append(("macs", node, name, out_lay, None, float(spatial * k), None))
            else:
                self.costs.append(("macs", node, name, out_lay, in_lay, float(spatial * k), None))
        elif isinstance(mod, nn.Linear):
            if out_lay is None:
                self.costs.append(("macs", node, name, None, None, float(math.prod(shape) * mod.in_features), None))
            else:
                self.costs.append(("macs", node, name, out_lay, in_lay, float(math.prod(shape[:-1])), None))

    def relu_cost(self, node, shape, gate: ReLUGate | None) -> None:
        if not shape:
            return
        name = meta(node).get("site", node.name)
        lay = self.layouts.get(node)
        per = math.prod(shape[1:])
        if lay is None:
            self.costs.append(("relus", node, name, None, None, float(math.prod(shape)), None))
            return
        if gate is None:
            w = np.full(len(lay), float(per))
        else:
            kept = gate.mask if bool(gate.hard) else (gate.alpha.detach() > 1e-2)
            w = kept.detach()[0].to(torch.float64).expand(gate.act_shape).reshape(len(lay), -1).sum(1).numpy()
        self.costs.append(("relus", node, name, lay, None, 1.0, w))

    # -- finish -------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        for node in self.gm.graph.nodes:
            self.visit(node)
        n = self.n_elems
        roots = np.array([self.uf[e] for e in range(n)], dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
        _, unit_of_elem = np.unique(roots, return_inverse=True)
        unit_of_elem = unit_of_elem.astype(np.int64)
        n_units = int(unit_of_elem.max()) + 1 if n else 0
        units = [Unit(i, []) for i in range(n_units)]
        for sp in self.spaces:
            for p in range(sp.size):
                units[unit_of_elem[sp.start + p]].members.append((sp.index, p))
        reasons: dict[str, int] = {}
        for e, why in self.pinned.items():
            u = units[unit_of_elem[e]]
            if u.pinned is None:
                u.pinned = why
                key = why.split(" (")[0]
                reasons[key] = reasons.get(key, 0) + 1
        # groups: spaces connected through shared units
        guf = UnionFind(range(len(self.spaces)))
        for u in units:
            sps = [s for s, _ in u.members]
            for s in sps[1:]:
                guf.union(sps[0], s)
        comp: dict[int, list[int]] = defaultdict(list)
        for sp in self.spaces:
            comp[guf[sp.index]].append(sp.index)
        groups = []
        group_of_space = {}
        for gi, sps in enumerate(sorted(comp.values(), key=lambda v: v[0])):
            groups.append(Group(gi, sps, []))
            for s in sps:
                group_of_space[s] = gi
        for u in units:
            u.group = group_of_space[u.members[0][0]]
            groups[u.group].units.append(u.index)

        def to_units(lay):
            return None if lay is None else unit_of_elem[lay]

        sites = [Site(n.name, str(n.target), role, to_units(a), to_units(b)) for n, role, a, b in self.sites]
        costs = [CostSite(n.name, kind, name, to_units(o), to_units(i), f, w) for kind, n, name, o, i, f, w in self.costs]
        layouts = {n.name: unit_of_elem[lay] for n, lay in self.layouts.items()}
        graph = ChannelGraph(self.spaces, units, groups, sites, costs, layouts, reasons)
        graph._unit_of_elem = unit_of_elem
        # metadata
        for node in self.gm.graph.nodes:
            m = meta(node)
            for k in ("channel_units", "channel_space", "prune_role"):
                m.pop(k, None)
            if node.name in layouts:
                m["channel_units"] = layouts[node.name].tolist()
        by_name = {n.name: n for n in self.gm.graph.nodes}
        for sp in self.spaces:
            if sp.kind in ("conv", "linear"):
                meta(by_name[sp.node])["channel_space"] = sp.key
        for s in sites:
            meta(by_name[s.node])["prune_role"] = s.role
        return graph


def own_meta(gm: fx.GraphModule) -> None:
    """Give every node its own ``meta["relucomp"]`` dict.

    ``copy.deepcopy`` of a GraphModule copies ``node.meta`` shallowly, so a copy
    shares the relucomp dicts with its original; passes that rewrite shapes of
    one copy (pruning) would otherwise corrupt the metadata of the other.
    """
    for n in gm.graph.nodes:
        if META in n.meta:
            n.meta[META] = dict(n.meta[META])


def analyze_channels(gm: fx.GraphModule, example: torch.Tensor | None = None) -> ChannelGraph:
    """Build the :class:`ChannelGraph` of ``gm`` (runs shape analysis first if ``example`` is given)."""
    own_meta(gm)
    if example is not None:
        from relucomp.passes.shape_prop import ShapeAnalysisPass

        ShapeAnalysisPass(example[:1]).call(gm)
    for n in gm.graph.nodes:
        if n.op == "placeholder" and "shape" not in n.meta.get("relucomp", {}):
            raise RuntimeError("ChannelDependencyPass needs ShapeAnalysisPass metadata; run it first "
                               "(or pass an example input)")
    return _Builder(gm).build()


class ChannelDependencyPass(AnalysisPass):
    """Group coupled channels (see the module docstring); ``.graph`` holds the result."""

    def __init__(self, example: torch.Tensor | None = None):
        self.example = example
        self.graph: ChannelGraph | None = None

    def analyze(self, gm: fx.GraphModule) -> dict[str, Any]:
        self.graph = analyze_channels(gm, self.example)
        return self.graph.summary()

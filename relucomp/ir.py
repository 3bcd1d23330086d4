"""The IR: a ``torch.fx.GraphModule`` plus per-node state in ``node.meta["relucomp"]``.

Keys relucomp writes under ``node.meta["relucomp"]`` (all optional):

``shape``      per-sample output shape (batch dimension dropped)
``relus``      ReLU elements per image evaluated by this node (ReLU-like nodes)
``relus_kept`` same, after gating/binarization
``macs``       multiply-accumulates per image (conv/linear)
``site``       stable name of a ReLU site (survives gate insertion and lowering)
``kind``       "relu" | "gate" | "sparse_relu" | "maxpool" | "conv" | "linear" | "bn" ...
"""

from __future__ import annotations

import copy
import linecache
import operator
import os
import sys
import traceback
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import TraceError
from .nn import LEAF_MODULES, ReLUGate, SparseReLU

META = "relucomp"

RELU_FUNCTIONS = (torch.relu, F.relu, torch.relu_, getattr(F, "relu_", None), torch.nn.functional.relu)
RELU_METHODS = ("relu", "relu_")


def meta(node: fx.Node) -> dict[str, Any]:
    """The relucomp metadata dict of ``node`` (created on first use)."""
    return node.meta.setdefault(META, {})


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The submodule a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def is_raw_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """True for any ReLU spelling before canonicalization."""
    if node.op == "call_module":
        return isinstance(module_of(gm, node), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in RELU_METHODS
    return False


def is_canonical_relu(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.relu


def relu_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"relu", "gate", "sparse_relu" or None."""
    if is_canonical_relu(node) or is_raw_relu(gm, node):
        return "relu"
    mod = module_of(gm, node)
    if isinstance(mod, ReLUGate):
        return "gate"
    if isinstance(mod, SparseReLU):
        return "sparse_relu"
    return None


def relu_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """All ReLU-like nodes (plain, gated, sparse) in graph order."""
    return [n for n in gm.graph.nodes if relu_kind(gm, n) is not None]


class RelucompTracer(fx.Tracer):
    """fx tracer that keeps relucomp's modules and user-named modules as leaves."""

    def __init__(self, leaf_modules: Iterable[type[nn.Module]] = ()):
        super().__init__()
        self.extra_leaves = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, LEAF_MODULES) or (self.extra_leaves and isinstance(m, self.extra_leaves)):
            return True
        return super().is_leaf_module(m, qualname)


def _internal_dirs() -> tuple[str, ...]:
    """Install folders of torch and relucomp (its ``passes`` live in their own folder)."""
    import relucomp
    import relucomp.passes

    dirs = [os.path.dirname(torch.__file__), os.path.dirname(relucomp.__file__), *relucomp.passes.__path__]
    return tuple(os.path.join(os.path.normcase(os.path.abspath(d)), "") for d in dirs)


def _user_frame(tb) -> str | None:
    """The innermost traceback frame outside torch / relucomp, as 'file:line: code'.

    Frames are classified by the packages' install folders, not by a folder
    *name*: a user's model living under some ``.../relucomp/...`` folder of
    their own is still the user's code.
    """
    internal = _internal_dirs()
    best = None
    for frame in traceback.extract_tb(tb):
        if frame.filename.startswith("<"):
            continue
        f = os.path.normcase(os.path.abspath(frame.filename))
        if f.startswith(internal):
            continue
        best = frame
    if best is None:
        return None
    code = (best.line or linecache.getline(best.filename, best.lineno)).strip()
    return f"{best.filename}:{best.lineno}: {code}"


def trace(model: nn.Module, *, leaf_modules: Iterable[type[nn.Module]] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` (a deep copy) into a GraphModule.

    Raises :class:`TraceError` naming the offending line/op and suggesting the
    usual fixes (mark the module as a leaf, remove data-dependent control flow).
    """
    if isinstance(model, fx.GraphModule):
        return copy_gm(model)
    model = copy.deepcopy(model)
    tracer = RelucompTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 - re-raised as a user error
        where = _user_frame(sys.exc_info()[2])
        kind = type(exc).__name__
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else kind
        cause = f"torch.fx cannot trace {type(model).__name__}: {kind}: {msg}"
        if where:
            cause += f" (at {where})"
        fix = (
            "make the forward free of data-dependent control flow (if/for on tensor values, "
            ".item(), numpy calls), or mark the offending submodule as a leaf: "
            "relucomp.compile(..., leaf_modules=[MyBlock]) / --leaf-module MyBlock; "
            "ReLUs inside a leaf module are not gated"
        )
        raise TraceError(cause, fix) from exc
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    return gm


def copy_gm(gm: fx.GraphModule) -> fx.GraphModule:
    """Deep copy of a GraphModule whose nodes own their relucomp metadata.

    ``copy.deepcopy`` of a GraphModule copies ``node.meta`` shallowly, so the
    copy's ``meta["relucomp"]`` dicts would be shared with the original and a
    pass run on the copy would rewrite the original's metadata.
    """
    new = copy.deepcopy(gm)
    for n in new.graph.nodes:
        if META in n.meta:
            n.meta[META] = copy.deepcopy(n.meta[META])
    return new


def node_order(gm: fx.GraphModule) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(gm.graph.nodes)}


def replace_all_uses_after(old: fx.Node, new: fx.Node, after: fx.Node, order: dict[fx.Node, int]) -> None:
    """Point every use of ``old`` that comes after ``after`` at ``new``."""
    for user in list(old.users):
        if user is new or order.get(user, -1) <= order[after]:
            continue
        user.replace_input_with(old, new)


def unique_attr_name(gm: nn.Module, base: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in base).strip("_") or "m"
    name, i = base, 1
    while hasattr(gm, name):
        name = f"{base}_{i}"
        i += 1
    return name


def add_module(gm: fx.GraphModule, base: str, module: nn.Module) -> str:
    """Register ``module`` on ``gm`` under a fresh top-level name and return it."""
    name = unique_attr_name(gm, base)
    gm.add_submodule(name, module)
    return name


def is_getitem(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem

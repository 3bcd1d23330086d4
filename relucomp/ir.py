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
import math
import operator
import os
import sys
import traceback
from typing import Any, Iterable, Sequence

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


# ---------------------------------------------------------------------------
# nonlinearities: what relucomp can gate, and every other comparison-bearing op
# ---------------------------------------------------------------------------

#: ops counted as one comparison-equivalent per output element (smooth activations are
#: evaluated in 2PC by piecewise approximations, each at least one comparison per element)
ONE_PER_ELEMENT = frozenset({
    "relu", "threshold", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish",
    "softplus", "sigmoid", "tanh", "logsigmoid", "softsign", "tanhshrink", "abs",
    "maximum", "minimum", "fmax", "fmin", "clamp_min", "clamp_max", "gt", "lt", "ge", "le",
    "softmax", "log_softmax", "glu", "erf",
})
#: two comparisons per element (both bounds of a clip / a piecewise-linear hat / sign's two tests); the ONNX
#: walker (relucomp.onnx_graph) counts the exported ops by the same convention
TWO_PER_ELEMENT = frozenset({"relu6", "hardswish", "hardsigmoid", "hardshrink", "softshrink", "sign", "sgn"})
#: reductions: comparisons = input elements - output elements
REDUCTIONS = frozenset({"amax", "amin", "argmax", "argmin", "adaptive_max_pool1d", "adaptive_max_pool2d",
                        "adaptive_max_pool3d", "max", "min", "aminmax"})
MAXPOOLS = frozenset({"max_pool1d", "max_pool2d", "max_pool3d"})


def op_name(target: Any) -> str:
    """Normalised name of a call target (function, method name or method descriptor).

    ``torch.relu_`` / ``x.clamp_`` → ``relu`` / ``clamp``; ``Tensor.__gt__`` → ``gt``;
    ``F.max_pool2d`` (and its ``_with_indices`` variants) → ``max_pool2d``.
    """
    name = target if isinstance(target, str) else getattr(target, "__name__", "") or ""
    if name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
        if name.startswith(("i", "r")) and name[1:] in ("gt", "lt", "ge", "le"):
            name = name[1:]
        return name
    name = name.lstrip("_")
    name = name.replace("_with_indices", "")
    if name.endswith("_") and not name.endswith("__"):
        name = name[:-1]
    return name


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _arg(args: Sequence[Any], kwargs: dict, i: int, key: str, default: Any = None) -> Any:
    """The i-th positional argument *after the input*, or keyword ``key``."""
    if len(args) > i + 1:
        return args[i + 1]
    return kwargs.get(key, default)


def call_is_inplace(target: Any, args: Sequence[Any], kwargs: dict) -> bool:
    """Whether a call mutates its first argument (``relu_``, ``clamp_``, ``inplace=True`` ...)."""
    name = target if isinstance(target, str) else getattr(target, "__name__", "") or ""
    if name.endswith("_") and not name.endswith("__"):
        return True
    if kwargs.get("inplace"):
        return True
    pos = {"threshold": 3, "hardtanh": 3, "leaky_relu": 2, "relu": 1, "relu6": 1, "elu": 2, "celu": 2, "selu": 1}
    k = pos.get(op_name(target))
    return k is not None and len(args) > k and args[k] is True


def is_relu_equivalent(target: Any, args: Sequence[Any], kwargs: dict) -> bool:
    """True when ``target(*args, **kwargs)`` computes exactly ``relu(args[0])``.

    Exact forms only: ``relu``; ``clamp``/``clip`` with ``min=0`` and no ``max``;
    ``clamp_min(0)``; ``threshold(x, 0, 0)``; ``hardtanh(x, 0, inf)``;
    ``leaky_relu(x, 0)``.  Bounds must be Python numbers (a tensor bound is not
    known to be zero).
    """
    name = op_name(target)
    if name == "relu":
        return True
    if name in ("clamp", "clip"):
        lo, hi = _arg(args, kwargs, 0, "min"), _arg(args, kwargs, 1, "max")
        return _num(lo) == 0.0 and hi is None
    if name == "clamp_min":
        return _num(_arg(args, kwargs, 0, "min")) == 0.0
    if name == "threshold":
        return _num(_arg(args, kwargs, 0, "threshold")) == 0.0 and _num(_arg(args, kwargs, 1, "value")) == 0.0
    if name == "hardtanh":
        lo, hi = _num(_arg(args, kwargs, 0, "min_val", -1.0)), _num(_arg(args, kwargs, 1, "max_val", 1.0))
        return lo == 0.0 and hi is not None and math.isinf(hi) and hi > 0
    if name == "leaky_relu":
        return _num(_arg(args, kwargs, 0, "negative_slope", 0.01)) == 0.0
    return False


def module_call(mod: nn.Module) -> tuple[str, tuple, dict] | None:
    """(function name, args after the input, kwargs) that an activation module calls."""
    if isinstance(mod, nn.ReLU):
        return "relu", (), {}
    if isinstance(mod, nn.Threshold):
        return "threshold", (mod.threshold, mod.value), {}
    if isinstance(mod, nn.Hardtanh):  # also ReLU6
        return "hardtanh", (mod.min_val, mod.max_val), {}
    if isinstance(mod, nn.LeakyReLU):
        return "leaky_relu", (mod.negative_slope,), {}
    return None


def _numel(t: Any) -> int:
    if isinstance(t, (tuple, list)) and t:
        t = t[0]
    return int(t.numel()) if isinstance(t, torch.Tensor) else 0


def comparisons_of_call(target: Any, args: Sequence[Any], kwargs: dict, out: Any) -> tuple[str, int] | None:
    """(op kind, comparisons) of one evaluated call, or None if it bears no comparison.

    ``args``/``kwargs`` are the runtime values (input first) and ``out`` the
    result; counts are for the whole call (divide by the batch for per-image
    counts).  ReLU-equivalent calls return kind ``"relu"``.
    """
    name = op_name(target)
    n = _numel(out)
    if n == 0:
        return None
    if is_relu_equivalent(target, args, kwargs):
        return "relu", n
    if name in ("clamp", "clip", "hardtanh"):
        if name == "hardtanh":
            lo, hi = _arg(args, kwargs, 0, "min_val", -1.0), _arg(args, kwargs, 1, "max_val", 1.0)
        else:
            lo, hi = _arg(args, kwargs, 0, "min"), _arg(args, kwargs, 1, "max")
        bounds = sum(1 for b in (lo, hi) if b is not None and not (_num(b) is not None and math.isinf(_num(b))))
        if name == "hardtanh" and _num(lo) == 0.0 and _num(hi) == 6.0:
            name = "relu6"
        return (name, bounds * n) if bounds else None
    if name in ONE_PER_ELEMENT:
        return name, n
    if name in TWO_PER_ELEMENT:
        return name, 2 * n
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return ("maximum" if name == "max" else "minimum"), n  # elementwise form
    if name in REDUCTIONS:
        return name, max(0, _numel(args[0]) - n) if args else 0
    if name in MAXPOOLS:
        k = _arg(args, kwargs, 0, "kernel_size")
        dims = int(name[-2])
        k = (k,) * dims if isinstance(k, int) else tuple(k)
        return "maxpool", n * (int(math.prod(k)) - 1)
    if name == "topk":
        k = int(_arg(args, kwargs, 0, "k"))
        rows = n // max(1, k)
        per_row = _numel(args[0]) // max(1, rows)
        return name, rows * k * max(0, per_row - 1)
    if name in ("sort", "argsort") and args and isinstance(args[0], torch.Tensor) and args[0].dim() > 0:
        dim_n = int(args[0].shape[_arg(args, kwargs, 0, "dim", -1)])
        return name, n * max(1, math.ceil(math.log2(max(2, dim_n))))
    return None


class NonlinearityCounter(torch.overrides.TorchFunctionMode):
    """Records every comparison-bearing torch call made while it is active.

    Used on opaque modules (user leaf modules): whatever they compute, the
    ReLUs and other nonlinearities they evaluate are seen here.  Only the
    outermost call is seen (the mode is inactive inside its own handler), so
    ``F.relu6`` is one record, not its internal ``hardtanh``.
    """

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            rec = comparisons_of_call(func, args, kwargs, out)
        except Exception:  # noqa: BLE001 - counting must never break the model's forward
            rec = None
        if rec is not None and rec[1] > 0:
            self.found.append(rec)
        return out

"""The one ONNX graph walker: what a 2PC runtime pays for, counted per image from the graph itself.

Used by ``relucomp inspect model.onnx``, ``relucomp estimate`` and the export
check.  ONNX shape inference gives every tensor's shape; per-image counts
exclude the first (batch) dimension.  Every comparison-bearing op is counted,
by the same convention as the fx side (``ShapeAnalysisPass`` /
:func:`relucomp.ir.comparisons_of_call`), so a report's counts and its
exported graph's counts agree:

===========================================  ==============================
op                                           comparisons per image
===========================================  ==============================
Relu, LeakyRelu, PRelu, Elu, Selu, Celu,     1 per element
ThresholdedRelu, Abs, Max/Min (2 inputs),
Greater, Less, GreaterOrEqual, LessOrEqual,
Equal; smooth activations (Sigmoid, Tanh,
Erf, Softplus, Softsign, Mish, Gelu,
Softmax, LogSoftmax: evaluated in 2PC by
piecewise approximations)
Clip                                         1 per finite bound per element
HardSigmoid, HardSwish, Sign                 2 per element (two bounds / two tests)
Max/Min with k inputs                        k-1 per element
MaxPool                                      (kernel elements - 1) per output element
GlobalMaxPool, ReduceMax/Min, ArgMax/Min,    input elements - output elements
TopK
===========================================  ==============================

``relus`` counts Relu elements and the exact ReLU equivalents the exporter
emits for ``clamp(min=0)`` / ``clamp_min(0)`` / ``hardtanh(0, inf)`` /
``leaky_relu(x, 0)`` / ``threshold(x, 0, 0)`` (``Max(x, 0)``, ``Clip(x, 0[, inf])``,
``LeakyRelu(alpha=0)``, ``Where(x <= 0, 0, x)``) — the forms relucomp's
canonicalization turns into ReLUs, which a leaf module may still hold.  The budget check on an export
(:func:`budgeted_comparisons`) uses every comparison-bearing op except MaxPool
unless the caller includes MaxPool; MaxPool comparisons are counted and
reported regardless.  Ops on rank ≤ 1 tensors (shape arithmetic of a dynamic
batch axis) are not per-image activations and are not counted.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

__all__ = ["walk", "load_proto", "budgeted_comparisons", "COMPARISON_OPS", "POOL_OPS", "OTHER_NONLINEAR"]

ONE_PER_ELEMENT = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Abs",
                   "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal",
                   "Sigmoid", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Gelu", "Softmax", "LogSoftmax")
TWO_PER_ELEMENT = ("HardSigmoid", "HardSwish", "Sign")
REDUCING = ("ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "TopK")
POOL_OPS = ("MaxPool", "GlobalMaxPool")
COMPARISON_OPS = ONE_PER_ELEMENT + TWO_PER_ELEMENT + REDUCING + POOL_OPS + ("Clip", "Max", "Min")
OTHER_NONLINEAR = ("Exp", "Log", "Sqrt", "Reciprocal", "Pow")  # nonlinear but not counted (nor on the fx side)


def load_proto(model: Any):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    try:
        return onnx.load(str(model) if isinstance(model, Path) else model)
    except FileNotFoundError:
        raise ModelLoadError(f"ONNX file {model} does not exist", "check the path") from None
    except Exception as exc:  # noqa: BLE001 — protobuf's DecodeError and friends: not an ONNX file
        raise ModelLoadError(f"{model} is not a readable ONNX file ({type(exc).__name__}: {exc})",
                             "re-export it, or check that the path names an .onnx file") from None


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _per_image(d: list) -> int | None:
    """Elements per image of an activation (rank ≥ 2, static dims past the batch), else None."""
    if not d or len(d) < 2 or any(not isinstance(v, int) for v in d[1:]):
        return None
    return math.prod(d[1:])


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            if a.ints:
                return list(a.ints)
            if a.type == 2:  # INT
                return a.i
            if a.type == 1:  # FLOAT
                return a.f
    return default


def _constants(g) -> dict:
    """Small constant tensors by name (initializers and Constant nodes), as numpy arrays."""
    from onnx import numpy_helper

    out = {i.name: i for i in g.initializer if math.prod(i.dims) <= 16}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = n.attribute[0].t
    arrays = {}
    for k, t in out.items():
        try:
            arrays[k] = numpy_helper.to_array(t)
        except Exception:  # noqa: BLE001 - an unreadable constant is just not a known constant
            pass
    return arrays


def _const_is(consts: dict, name: str, pred) -> bool:
    a = consts.get(name)
    return a is not None and a.size > 0 and bool(pred(a.astype("float64")).all())


def _is_zero(consts: dict, name: str) -> bool:
    return _const_is(consts, name, lambda a: a == 0)


def _relu_equivalent(node, consts: dict, consumers: dict) -> bool:
    """Whether ``node`` computes exactly relu of its first input (see the module docstring)."""
    op, ins = node.op_type, [i for i in node.input]
    if op == "Relu":
        return True
    if op == "LeakyRelu":
        return _attr(node, "alpha", 0.01) == 0.0
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] else None
        hi = ins[2] if len(ins) > 2 and ins[2] else None
        if lo is None:  # opset < 11: attributes
            return _attr(node, "min") == 0.0 and _attr(node, "max") in (None, float("inf"))
        return _is_zero(consts, lo) and (hi is None or _const_is(consts, hi, lambda a: a == float("inf")))
    if op == "Max" and len([i for i in ins if i]) == 2:
        return _is_zero(consts, ins[1]) != _is_zero(consts, ins[0])
    if op in ("LessOrEqual", "Less", "Greater", "GreaterOrEqual") and len(ins) == 2 and _is_zero(consts, ins[1]):
        uses = consumers.get(node.output[0], [])
        below = op in ("LessOrEqual", "Less")  # Where(x <= 0, 0, x) / Where(x > 0, x, 0)
        return bool(uses) and all(
            u.op_type == "Where" and len(u.input) == 3 and u.input[0] == node.output[0]
            and (_is_zero(consts, u.input[1]) and u.input[2] == ins[0] if below
                 else u.input[1] == ins[0] and _is_zero(consts, u.input[2]))
            for u in uses)
    return False


def _comparisons(node, shapes: dict, consts: dict) -> int | None:
    """Comparisons per image of one node (None: shape unknown; 0: not comparison-bearing)."""
    op = node.op_type
    out = _per_image(shapes.get(node.output[0], [])) if node.output else None
    inp = _per_image(shapes.get(node.input[0], [])) if node.input else None
    if op in ONE_PER_ELEMENT:
        n = out if out is not None else inp
        return n
    if op in TWO_PER_ELEMENT:
        n = out if out is not None else inp
        return None if n is None else 2 * n
    if op == "Clip":
        bounds = sum(1 for i in (1, 2) if len(node.input) > i and node.input[i]
                     and not _const_is(consts, node.input[i], lambda a: abs(a) == float("inf")))
        bounds += sum(1 for a in node.attribute if a.name in ("min", "max"))  # opset < 11
        n = out if out is not None else inp
        return None if n is None else bounds * n
    if op in ("Max", "Min"):
        return None if out is None else max(0, len([i for i in node.input if i]) - 1) * out
    if op == "MaxPool":
        k = _attr(node, "kernel_shape")
        return None if out is None or not k else out * (math.prod(k) - 1)
    if op in ("GlobalMaxPool",) + REDUCING:
        if inp is None:
            return None
        o = _per_image(shapes.get(node.output[0], [])) or 0
        if op == "GlobalMaxPool":
            d = shapes.get(node.input[0], [])
            return d[1] * (math.prod(d[2:]) - 1)
        return max(0, inp - max(o, 1))
    return 0


def _macs(node, shapes: dict, inits: dict) -> int:
    out = shapes.get(node.output[0], [])
    w = inits.get(node.input[1]) or shapes.get(node.input[1]) or []
    n = _per_image(out)
    if n is None or not w or not all(isinstance(v, int) for v in w):
        return 0
    if node.op_type == "Conv":
        return n * math.prod(w[1:])
    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return n * (w[1] if (node.op_type == "Gemm" and trans_b) else w[0])


def walk(model: Any, *, include_maxpool: bool = False) -> dict[str, Any]:
    """Walk an ONNX model (proto or path) once and count, per image, everything PI pays for."""
    import onnx

    proto = load_proto(model)
    g = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {vi.name: _dims(vi) for vi in list(g.value_info) + list(g.input) + list(g.output)}
    inits = {i.name: list(i.dims) for i in g.initializer}
    consts = _constants(g)
    consumers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    rows: list[dict[str, Any]] = []
    relu_nodes: list[dict[str, Any]] = []
    by_op: dict[str, int] = {}
    ops: dict[str, int] = {}
    other: dict[str, int] = {}
    uncounted: list[str] = []
    relus = macs = gathered = selected = slices = 0
    for node in g.node:
        op = node.op_type
        ops[op] = ops.get(op, 0) + 1
        shape = list((shapes.get(node.output[0]) or [])[1:]) if node.output else []
        row = {"name": node.name, "op": op, "kind": op.lower(), "shape": shape, "relus": 0, "relus_kept": 0,
               "comparisons": 0, "macs": 0}
        if op in COMPARISON_OPS:
            n = _comparisons(node, shapes, consts)
            if n is None:
                if op == "Relu":
                    raise ModelLoadError(f"cannot infer a static per-image shape for Relu input {node.input[0]!r} "
                                         "(its ReLUs cannot be counted)", "export the ONNX with a leading batch axis "
                                         "and static per-image shapes (e.g. N x C x H x W; torch.onnx.export does)")
                if len(shapes.get(node.output[0], [])) >= 2 or not shapes.get(node.output[0]):
                    uncounted.append(node.name or op)
                n = 0
            row["comparisons"] = n
            if n:
                by_op[op] = by_op.get(op, 0) + n
            if n and _relu_equivalent(node, consts, consumers):
                d = shapes.get(node.input[0], [])
                row["kind"] = "relu"
                row["shape"], row["relus"], row["relus_kept"] = list(d[1:]), n, n
                relus += n
                relu_nodes.append({"node": node.name, "input": node.input[0], "relus": n})
            rows.append(row)
        elif op in ("Conv", "Gemm", "MatMul"):
            row["macs"] = _macs(node, shapes, inits)
            macs += row["macs"]
            rows.append(row)
        elif op in OTHER_NONLINEAR:
            other[op] = other.get(op, 0) + 1
        elif op == "Gather":
            d = shapes.get(node.output[0], [])
            n = _per_image(d)
            if node.input[0] not in inits and n is not None:
                gathered += n  # data movement on an activation (shape arithmetic has rank ≤ 1)
        elif op == "Where":
            n = _per_image(shapes.get(node.output[0], []))
            if n is not None:
                selected += n
        elif op == "Slice":
            slices += 1
    pool = sum(by_op.get(o, 0) for o in POOL_OPS)
    total = sum(by_op.values())
    inp = next((vi for vi in g.input if vi.name not in inits), None)
    in_shape = [d if isinstance(d, int) and d > 0 else 1 for d in (_dims(inp) if inp is not None else [])]
    return {"relus": relus, "relu_nodes": relu_nodes, "comparisons": total, "comparisons_by_op": by_op,
            "maxpool_comparisons": pool,
            "budgeted_comparisons": total if include_maxpool else total - pool,
            "include_maxpool": include_maxpool, "uncounted": uncounted, "other_nonlinear_ops": other,
            "macs": macs, "gather_elements": gathered, "where_elements": selected, "slice_ops": slices,
            "ops": ops, "input_shape": in_shape, "params": int(sum(math.prod(v) for v in inits.values())),
            "rows": rows}


def budgeted_comparisons(counts: dict[str, Any], *, include_maxpool: bool = False) -> int:
    """What counts against a ReLU budget: every comparison, MaxPool only when included."""
    return counts["comparisons"] if include_maxpool else counts["comparisons"] - counts["maxpool_comparisons"]

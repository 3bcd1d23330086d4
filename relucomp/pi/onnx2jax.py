"""ONNX → JAX translation of the static graphs relucomp emits (runs in the SPU venv).

Needs only ``numpy``, ``onnx`` and ``jax``; it must never import torch (the SPU
venv has none).  Weights stay separate from the graph so that a 2PC runtime
can feed them as the server's input:

* float initializers (weights, biases, folded BatchNorm scales) are
  **parameters** — arguments of the JAX function, in :attr:`JaxModel.param_names`
  order;
* integer/bool initializers and ``Constant`` nodes (gather indices, reshape
  shapes, slice bounds) are **public constants**: the graph's structure, which
  both parties know.

Values are evaluated with numpy while they are static (constants, and shape
arithmetic on static shapes: ``Shape``, ``Gather`` on a shape, ``Concat`` of
dims...) and with ``jax.numpy`` once they depend on the input or a parameter,
so exporter-generated shape subgraphs fold away and the traced JAX program
holds only the tensor ops.  Supported ops: Conv, ConvTranspose (no), Gemm,
MatMul, Add, Sub, Mul, Div, Neg, Relu, Max/Min (elementwise), Gather, GatherND, Concat,
Slice, Split, Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Expand,
GlobalAveragePool, GlobalMaxPool, ReduceMean, ReduceSum, AveragePool, MaxPool,
BatchNormalization (inference), Identity, Dropout, Constant, Cast, Shape,
ConstantOfShape, Range, Pad (constant).  BatchNormalization is rewritten by
:func:`prepare` into ``Mul``/``Add`` with folded parameters (server-side
plaintext preprocessing, never computed under 2PC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Graph", "JaxModel", "load_graph", "prepare", "translate", "UnsupportedOp", "SUPPORTED_OPS"]


class UnsupportedOp(ValueError):
    """The ONNX graph uses an op (or an attribute value) the translator does not handle."""


# ---------------------------------------------------------------------------
# graph container
# ---------------------------------------------------------------------------

@dataclass
class Node:
    op: str
    name: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[tuple[str, list[Any]]]  # graph inputs that are not initializers: (name, dims)
    outputs: list[str]
    opset: int = 18
    metadata: dict[str, str] = field(default_factory=dict)


def _attr_value(a) -> Any:
    from onnx import helper, numpy_helper

    if a.type == a.TENSOR:
        return numpy_helper.to_array(a.t)
    return helper.get_attribute_value(a)


def load_graph(model: Any) -> Graph:
    """Parse an ONNX model (path, bytes or ``ModelProto``) into a :class:`Graph`."""
    import onnx
    from onnx import numpy_helper

    if isinstance(model, (bytes, bytearray)):
        proto = onnx.load_from_string(bytes(model))
    elif isinstance(model, onnx.ModelProto):
        proto = model
    else:
        proto = onnx.load(str(model))
    g = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    inputs = []
    for vi in g.input:
        if vi.name in inits:
            continue
        dims: list[Any] = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        inputs.append((vi.name, dims))
    nodes = []
    for i, n in enumerate(g.node):
        if n.domain not in ("", "ai.onnx"):
            raise UnsupportedOp(f"node {n.name or i} uses custom domain {n.domain!r}")
        nodes.append(Node(n.op_type, n.name or f"{n.op_type}_{i}", list(n.input), list(n.output),
                          {a.name: _attr_value(a) for a in n.attribute}))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    meta = {p.key: p.value for p in proto.metadata_props}
    return Graph(nodes, inits, inputs, [o.name for o in g.output], opset, meta)


def prepare(graph: Graph) -> Graph:
    """Server-side plaintext preprocessing: BatchNormalization → Mul + Add.

    ``y = x·s + t`` with ``s = gamma/sqrt(var+eps)`` and ``t = beta − mean·s``,
    computed in numpy from the initializers, so no square root or division is
    ever evaluated under 2PC.  Returns a new :class:`Graph`.
    """
    nodes: list[Node] = []
    inits = dict(graph.initializers)
    for n in graph.nodes:
        if n.op == "BatchNormalization" and all(i in inits for i in n.inputs[1:5]):
            gamma, beta, mean, var = (inits[i].astype(np.float64) for i in n.inputs[1:5])
            eps = float(n.attrs.get("epsilon", 1e-5))
            s = gamma / np.sqrt(var + eps)
            t = beta - mean * s
            sn, tn = f"{n.name}.scale_folded", f"{n.name}.shift_folded"
            inits[sn] = s.astype(np.float32)
            inits[tn] = t.astype(np.float32)
            mid = f"{n.outputs[0]}.scaled"
            nodes.append(Node("_ChannelMul", n.name + "/mul", [n.inputs[0], sn], [mid], {}))
            nodes.append(Node("_ChannelAdd", n.name + "/add", [mid, tn], [n.outputs[0]], {}))
        else:
            nodes.append(n)
    used = {i for n in nodes for i in n.inputs}
    inits = {k: v for k, v in inits.items() if k in used}
    return Graph(nodes, inits, list(graph.inputs), list(graph.outputs), graph.opset, dict(graph.metadata))


# ---------------------------------------------------------------------------
# op implementations
# ---------------------------------------------------------------------------

def _static(*vals) -> bool:
    return all(v is None or isinstance(v, (np.ndarray, np.generic, int, float)) for v in vals)


def _xp(*vals):
    if _static(*vals):
        return np
    import jax.numpy as jnp

    return jnp


def _ints(v) -> list[int]:
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _need_static(v, what: str, node: Node) -> np.ndarray:
    if not _static(v):
        raise UnsupportedOp(f"{node.op} {node.name}: {what} must be a constant (static graphs only)")
    return np.asarray(v)


def _conv(node: Node, x, w, b=None):
    from jax import lax

    a = node.attrs
    nd = np.ndim(w) - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedOp(f"Conv {node.name}: auto_pad={a['auto_pad']!r}")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    padding = [(pads[i], pads[i + nd]) for i in range(nd)]
    group = int(a.get("group", 1))
    if nd == 2:
        # SPU runs its fast conv (im2col / Cheetah's HE conv2d) only for NHWC input and HWIO
        # kernels; any other layout takes a generic per-element loop, orders of magnitude slower.
        y = lax.conv_general_dilated(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0), window_strides=strides,
                                     padding=padding, rhs_dilation=dil, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=group)
        y = y.transpose(0, 3, 1, 2)
    else:
        spec = {1: ("NCH", "OIH", "NCH"), 3: ("NCDHW", "OIDHW", "NCDHW")}[nd]
        y = lax.conv_general_dilated(x, w, window_strides=strides, padding=padding, rhs_dilation=dil,
                                     dimension_numbers=spec, feature_group_count=group)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * nd)
    return y


def _gemm(node: Node, A, B, C=None):
    xp = _xp(A, B, C)
    a = node.attrs
    if a.get("transA", 0):
        A = A.T
    if a.get("transB", 0):
        B = B.T
    y = xp.matmul(A, B)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if C is not None:
        y = y + (C if beta == 1.0 else C * beta)
    return y


def _binary(fn_name: str):
    def impl(node: Node, a, b):
        xp = _xp(a, b)
        if fn_name == "div":
            if _static(b) and not _static(a):
                return a * (1.0 / np.asarray(b, dtype=np.float64)).astype(np.float32)  # public reciprocal
            if _static(a, b):
                aa, bb = np.asarray(a), np.asarray(b)
                if np.issubdtype(aa.dtype, np.integer) and np.issubdtype(bb.dtype, np.integer):
                    return np.trunc(aa / bb).astype(aa.dtype)
            return xp.divide(a, b)
        return {"add": xp.add, "sub": xp.subtract, "mul": xp.multiply, "max": xp.maximum, "min": xp.minimum,
                "equal": xp.equal, "less": xp.less, "greater": xp.greater}[fn_name](a, b)

    return impl


def _relu(node: Node, x):
    if _static(x):
        return np.maximum(x, 0)
    import jax

    return jax.nn.relu(x)


def _gather(node: Node, data, idx):
    axis = int(node.attrs.get("axis", 0))
    idx = _need_static(idx, "indices", node).astype(np.int64)
    dim = np.shape(data)[axis]
    idx = np.where(idx < 0, idx + dim, idx)
    if _static(data):
        return np.take(np.asarray(data), idx, axis=axis)
    import jax.numpy as jnp

    return jnp.take(data, idx, axis=axis, mode="clip" if idx.size else None)


def _gather_nd(node: Node, data, idx):
    b = int(node.attrs.get("batch_dims", 0))
    idx = _need_static(idx, "indices", node).astype(np.int64)
    if b:
        lead = idx.reshape(-1, *idx.shape[b:])
        if not (lead == lead[0]).all():
            raise UnsupportedOp(f"GatherND {node.name}: batch_dims={b} with indices that differ across the batch")
        idx = lead[0]
    shape = np.shape(data)[b:]
    idx = np.where(idx < 0, idx + np.asarray(shape[: idx.shape[-1]]), idx)
    key = (slice(None),) * b + tuple(np.moveaxis(idx, -1, 0))
    return data[key]


def _concat(node: Node, *xs):
    xs = [x for x in xs if x is not None]
    return _xp(*xs).concatenate(xs, axis=int(node.attrs["axis"]))


def _flatten(node: Node, x):
    axis = int(node.attrs.get("axis", 1))
    shape = np.shape(x)
    axis = axis + len(shape) if axis < 0 else axis
    return x.reshape(int(np.prod(shape[:axis], dtype=np.int64)), -1)


def _reshape(node: Node, x, shape):
    shape = _ints(_need_static(shape, "shape", node))
    allowzero = int(node.attrs.get("allowzero", 0))
    cur = np.shape(x)
    out = [cur[i] if (s == 0 and not allowzero) else s for i, s in enumerate(shape)]
    return _xp(x).reshape(x, out)


def _transpose(node: Node, x):
    perm = node.attrs.get("perm")
    return _xp(x).transpose(x, None if perm is None else list(perm))


def _axes(node: Node, axes_in, ndim: int) -> list[int] | None:
    axes = node.attrs.get("axes") if axes_in is None else _ints(_need_static(axes_in, "axes", node))
    if axes is None:
        return None
    return sorted(int(a) % ndim for a in axes)


def _squeeze(node: Node, x, axes=None):
    ax = _axes(node, axes, np.ndim(x))
    return _xp(x).squeeze(x, axis=None if ax is None else tuple(ax))


def _unsqueeze(node: Node, x, axes=None):
    axes = node.attrs.get("axes") if axes is None else _ints(_need_static(axes, "axes", node))
    out_nd = np.ndim(x) + len(axes)
    y = x
    for a in sorted(int(a) % out_nd for a in axes):
        y = _xp(x).expand_dims(y, a)
    return y


def _reduce(kind: str):
    def impl(node: Node, x, axes=None):
        keep = bool(node.attrs.get("keepdims", 1))
        ax = _axes(node, axes, np.ndim(x))
        if ax is None or (not ax and not node.attrs.get("noop_with_empty_axes", 0)):
            ax = list(range(np.ndim(x)))
        if not ax:
            return x
        xp = _xp(x)
        s = xp.sum(x, axis=tuple(ax), keepdims=keep)
        if kind == "mean":
            n = int(np.prod([np.shape(x)[a] for a in ax]))
            s = s * np.float32(1.0 / n)  # public reciprocal, not a secret division
        return s

    return impl


def _global_avg(node: Node, x):
    axes = tuple(range(2, np.ndim(x)))
    n = int(np.prod([np.shape(x)[a] for a in axes]))
    return _xp(x).sum(x, axis=axes, keepdims=True) * np.float32(1.0 / n)


def _global_max(node: Node, x):
    return _xp(x).max(x, axis=tuple(range(2, np.ndim(x))), keepdims=True)


def _pool_geometry(node: Node, x):
    a = node.attrs
    nd = np.ndim(x) - 2
    k = list(a["kernel_shape"])
    s = list(a.get("strides", [1] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET", b"VALID", "VALID"):
        raise UnsupportedOp(f"{node.op} {node.name}: auto_pad={a['auto_pad']!r}")
    if any(d != 1 for d in a.get("dilations", [1] * nd)):
        raise UnsupportedOp(f"{node.op} {node.name}: dilations")
    if a.get("ceil_mode", 0):
        # extend the end padding so the last (partial) window exists, as ceil_mode does
        for i in range(nd):
            size = np.shape(x)[2 + i] + pads[i] + pads[i + nd]
            out = -(-(size - k[i]) // s[i]) + 1
            need = (out - 1) * s[i] + k[i] - size
            if (out - 1) * s[i] >= np.shape(x)[2 + i] + pads[i]:
                need -= s[i]
            pads[i + nd] += max(0, need)
    return nd, k, s, pads


def _avgpool(node: Node, x):
    from jax import lax

    nd, k, s, pads = _pool_geometry(node, x)
    window, strides = (1, 1, *k), (1, 1, *s)
    padding = ((0, 0), (0, 0), *[(pads[i], pads[i + nd]) for i in range(nd)])
    total = lax.reduce_window(x, np.float32(0), lax.add, window, strides, padding)
    if node.attrs.get("count_include_pad", 0) or not any(pads):
        return total * np.float32(1.0 / math.prod(k))
    counts = np.ones((), np.float64)  # valid (unpadded) inputs per window: separable over the spatial dims
    for i in range(nd):
        size, out = np.shape(x)[2 + i], np.shape(total)[2 + i]
        start = np.arange(out) * s[i] - pads[i]
        per = np.minimum(start + k[i], size) - np.maximum(start, 0)
        counts = np.multiply.outer(counts, per)
    return total * (1.0 / counts).astype(np.float32)[None, None]


def _maxpool(node: Node, x):
    from jax import lax

    if len(node.outputs) > 1 and node.outputs[1]:
        raise UnsupportedOp(f"MaxPool {node.name}: Indices output")
    nd, k, s, pads = _pool_geometry(node, x)
    window, strides = (1, 1, *k), (1, 1, *s)
    if any(pads):
        import jax.numpy as jnp

        x = jnp.pad(x, ((0, 0), (0, 0), *[(pads[i], pads[i + nd]) for i in range(nd)]),
                    constant_values=np.float32(-1e4))  # finite: fixed-point runtimes have no -inf
    return lax.reduce_window(x, np.float32(-np.inf), lax.max, window, strides, "VALID")


def _channel(op: str):
    def impl(node: Node, x, p):
        shape = (1, -1) + (1,) * (np.ndim(x) - 2)
        p = p.reshape(shape)
        return x * p if op == "mul" else x + p

    return impl


def _batchnorm(node: Node, x, scale, bias, mean, var):
    if not _static(scale, bias, mean, var):
        raise UnsupportedOp(f"BatchNormalization {node.name}: run prepare() first (BN parameters must be folded)")
    eps = float(node.attrs.get("epsilon", 1e-5))
    s = np.asarray(scale) / np.sqrt(np.asarray(var) + eps)
    t = np.asarray(bias) - np.asarray(mean) * s
    shape = (1, -1) + (1,) * (np.ndim(x) - 2)
    return x * s.reshape(shape).astype(np.float32) + t.reshape(shape).astype(np.float32)


def _constant(node: Node):
    a = node.attrs
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            v = np.asarray(a[key])
            if key in ("value_int", "value_ints"):
                v = v.astype(np.int64)
            elif key in ("value_float", "value_floats"):
                v = v.astype(np.float32)
            return v
    raise UnsupportedOp(f"Constant {node.name}: unsupported attribute {list(a)}")


_ONNX_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
                10: np.float16, 11: np.float64}


def _cast(node: Node, x):
    to = _ONNX_DTYPES.get(int(node.attrs["to"]))
    if to is None:
        raise UnsupportedOp(f"Cast {node.name}: to={node.attrs['to']}")
    if _static(x):
        return np.asarray(x).astype(to)
    if np.issubdtype(to, np.floating) and np.issubdtype(x.dtype, np.floating):
        return x  # float→float: the runtime has one fixed-point type
    return x.astype(to)


def _shape(node: Node, x):
    shape = np.asarray(np.shape(x), dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return shape[start:end]


def _slice(node: Node, x, starts, ends, axes=None, steps=None):
    starts = _ints(_need_static(starts, "starts", node))
    ends = _ints(_need_static(ends, "ends", node))
    nd = np.ndim(x)
    axes = list(range(len(starts))) if axes is None else [a % nd for a in _ints(_need_static(axes, "axes", node))]
    steps = [1] * len(starts) if steps is None else _ints(_need_static(steps, "steps", node))
    idx = [slice(None)] * nd
    for a, st, en, sp in zip(axes, starts, ends, steps):
        dim = np.shape(x)[a]
        st, en, _ = slice(max(min(st, 2**62), -2**62), max(min(en, 2**62), -2**62), sp).indices(dim)
        idx[a] = slice(st, en if en >= 0 else None, sp)
    return x[tuple(idx)]


def _split(node: Node, x, split=None):
    axis = int(node.attrs.get("axis", 0)) % np.ndim(x)
    dim = np.shape(x)[axis]
    if split is None:
        split = node.attrs.get("split")
    if split is None:
        n = len(node.outputs)
        size = -(-dim // n)
        split = [size] * (n - 1) + [dim - size * (n - 1)]
    split = _ints(split)
    out, start = [], 0
    for s in split:
        idx = [slice(None)] * np.ndim(x)
        idx[axis] = slice(start, start + s)
        out.append(x[tuple(idx)])
        start += s
    return out


def _expand(node: Node, x, shape):
    shape = _ints(_need_static(shape, "shape", node))
    target = np.broadcast_shapes(np.shape(x), tuple(shape))
    return _xp(x).broadcast_to(x, target)


def _const_of_shape(node: Node, shape):
    shape = _ints(_need_static(shape, "shape", node))
    v = node.attrs.get("value")
    v = np.zeros(1, np.float32) if v is None else np.asarray(v).reshape(-1)
    return np.full(shape, v[0], dtype=v.dtype)


def _range(node: Node, start, limit, delta):
    return np.arange(np.asarray(start).item(), np.asarray(limit).item(), np.asarray(delta).item())


def _pad(node: Node, x, pads=None, value=None, axes=None):
    mode = node.attrs.get("mode", b"constant")
    if mode not in (b"constant", "constant"):
        raise UnsupportedOp(f"Pad {node.name}: mode={mode!r}")
    pads = _ints(_need_static(pads, "pads", node)) if pads is not None else list(node.attrs.get("pads"))
    nd = np.ndim(x)
    axes = list(range(nd)) if axes is None else [a % nd for a in _ints(axes)]
    width = [(0, 0)] * nd
    for i, a in enumerate(axes):
        width[a] = (pads[i], pads[i + len(axes)])
    cv = 0.0 if value is None else float(np.asarray(value).reshape(-1)[0]) if np.asarray(value).size else 0.0
    return _xp(x).pad(x, width, constant_values=cv)


def _where(node: Node, c, a, b):
    c = _need_static(c, "condition", node)
    return _xp(a, b).where(c, a, b)


OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda n, a, b: _xp(a, b).matmul(a, b),
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Max": _binary("max"), "Min": _binary("min"),
    "Equal": _binary("equal"), "Less": _binary("less"), "Greater": _binary("greater"),
    "Neg": lambda n, x: -x,
    "Relu": _relu,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Concat": _concat,
    "Slice": _slice,
    "Split": _split,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "GlobalAveragePool": _global_avg,
    "GlobalMaxPool": _global_max,
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "AveragePool": _avgpool,
    "MaxPool": _maxpool,
    "BatchNormalization": _batchnorm,
    "_ChannelMul": _channel("mul"),
    "_ChannelAdd": _channel("add"),
    "Identity": lambda n, x: x,
    "Dropout": lambda n, x, *rest: x,
    "Constant": _constant,
    "Cast": _cast,
    "Shape": _shape,
    "ConstantOfShape": _const_of_shape,
    "Range": _range,
    "Pad": _pad,
    "Where": _where,
}
SUPPORTED_OPS = tuple(sorted(k for k in OPS if not k.startswith("_")))

#: ops a 2PC runtime evaluates with a nonlinear protocol (comparisons)
NONLINEAR_OPS = ("Relu", "MaxPool", "GlobalMaxPool", "Max", "Min")


# ---------------------------------------------------------------------------
# the translated model
# ---------------------------------------------------------------------------

@dataclass(eq=False)
class JaxModel:
    """A translated graph: ``model(x, *params)`` is a JAX-traceable function."""

    graph: Graph
    param_names: list[str]
    input_name: str
    input_dims: list[Any]

    def params(self) -> list[np.ndarray]:
        """The parameter values (the server's private input), in ``param_names`` order."""
        return [np.asarray(self.graph.initializers[n], dtype=np.float32) for n in self.param_names]

    def param_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(self.graph.initializers[n].shape) for n in self.param_names]

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        dims = list(self.input_dims)
        out = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0 and i > 0:
                out.append(d)
            elif i == 0:
                out.append(batch)
            else:
                raise UnsupportedOp(f"input {self.input_name!r} has a symbolic dimension {d!r} at axis {i}")
        return tuple(out)

    def __call__(self, x, *params):
        env: dict[str, Any] = {"": None}
        for name, v in self.graph.initializers.items():
            if name not in self._param_set:
                env[name] = np.asarray(v)
        for name, v in zip(self.param_names, params):
            env[name] = v
        env[self.input_name] = x
        for node in self.graph.nodes:
            impl = OPS.get(node.op)
            if impl is None:
                raise UnsupportedOp(f"op {node.op} ({node.name}) is not supported by relucomp's ONNX→JAX translator")
            args = [env[i] if i else None for i in node.inputs]
            while args and args[-1] is None:
                args.pop()
            out = impl(node, *args)
            outs = out if isinstance(out, (list, tuple)) else [out]
            for name, v in zip(node.outputs, outs):
                if name:
                    env[name] = v
        res = [env[o] for o in self.graph.outputs]
        return res[0] if len(res) == 1 else tuple(res)

    @property
    def _param_set(self) -> set[str]:
        return set(self.param_names)


def translate(model: Any) -> JaxModel:
    """Parse (if needed), :func:`prepare` and wrap an ONNX model as a :class:`JaxModel`."""
    graph = model if isinstance(model, Graph) else load_graph(model)
    graph = prepare(graph)
    for node in graph.nodes:
        if node.op not in OPS:
            raise UnsupportedOp(f"op {node.op} ({node.name}) is not supported by relucomp's ONNX→JAX translator; "
                                f"supported: {', '.join(SUPPORTED_OPS)}")
    if len(graph.inputs) != 1:
        raise UnsupportedOp(f"the graph has {len(graph.inputs)} inputs; one image input is supported")
    used = [i for n in graph.nodes for i in n.inputs]
    seen: set[str] = set()
    params = []
    for name in used:
        v = graph.initializers.get(name)
        if v is not None and name not in seen and np.issubdtype(v.dtype, np.floating):
            params.append(name)
            seen.add(name)
    name, dims = graph.inputs[0]
    return JaxModel(graph, params, name, dims)


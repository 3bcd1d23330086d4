"""Verification helpers: graph lint, numerical equivalence, ONNX ReLU counting."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn


def lint(gm: fx.GraphModule) -> list[str]:
    """Return a list of problems (empty when the graph is well formed).

    Beyond ``fx.Graph.lint`` (topological order, dangling references) this
    checks that every ``call_module`` / ``get_attr`` target resolves and that
    the graph has exactly one output.
    """
    problems: list[str] = []
    try:
        gm.graph.lint()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"fx lint: {exc}")
    outputs = [n for n in gm.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        problems.append(f"graph has {len(outputs)} output nodes")
    for n in gm.graph.nodes:
        if n.op == "call_module":
            try:
                gm.get_submodule(n.target)
            except AttributeError:
                problems.append(f"node {n.name} calls missing module {n.target!r}")
        elif n.op == "get_attr":
            obj = gm
            try:
                for part in n.target.split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                problems.append(f"node {n.name} reads missing attribute {n.target!r}")
    return problems


@torch.no_grad()
def run_eval(model: nn.Module, inputs) -> Any:
    """Run ``model`` in eval mode on ``inputs`` and restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
    finally:
        model.train(was_training)


def _flatten(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _flatten(e)]
    if isinstance(x, dict):
        return [t for k in sorted(x) for t in _flatten(x[k])]
    return []


def allclose(a, b, *, atol: float = 1e-4, rtol: float = 1e-4) -> tuple[bool, float]:
    """Compare (nested) outputs; return (ok, max absolute difference)."""
    fa, fb = _flatten(a), _flatten(b)
    if len(fa) != len(fb):
        return False, math.inf
    worst = 0.0
    ok = True
    for x, y in zip(fa, fb):
        if x.shape != y.shape:
            return False, math.inf
        x = x.detach().double()
        y = torch.as_tensor(y).detach().double()
        diff = (x - y).abs()
        if diff.numel():
            worst = max(worst, float(diff.max()))
        ok &= bool(torch.all(diff <= atol + rtol * y.abs()))
    return ok, worst


# ----------------------------------------------------------------------------
# ONNX-side counting (from the graph, not from relucomp's bookkeeping)
# ----------------------------------------------------------------------------

def _dims(vi) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def onnx_relu_count(model_or_path) -> dict[str, Any]:
    """Count ReLU elements per image in an ONNX model from the graph itself.

    Runs ONNX shape inference and sums, over every ``Relu`` node, the number of
    elements of its input excluding the (first, batch) dimension.  Also counts
    MaxPool comparisons and other nonlinear ops (which PI pays for too).
    """
    import onnx

    model = onnx.load(model_or_path) if isinstance(model_or_path, (str, bytes)) or hasattr(model_or_path, "__fspath__") else model_or_path
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    per_node = []
    total = 0
    other: dict[str, int] = {}
    maxpool_cmp = 0
    for node in inferred.graph.node:
        if node.op_type == "Relu":
            dims = shapes.get(node.input[0])
            if not dims or any(not isinstance(d, int) for d in dims[1:]):
                raise ValueError(f"cannot infer a static per-image shape for Relu input {node.input[0]!r}")
            n = math.prod(dims[1:])
            per_node.append({"node": node.name, "input": node.input[0], "relus": n})
            total += n
        elif node.op_type == "MaxPool":
            dims = shapes.get(node.output[0]) or []
            k = [a.ints for a in node.attribute if a.name == "kernel_shape"]
            if dims and k and all(isinstance(d, int) for d in dims[1:]):
                maxpool_cmp += math.prod(dims[1:]) * (math.prod(k[0]) - 1)
        elif node.op_type in ("PRelu", "LeakyRelu", "Clip", "Max", "Min", "Sigmoid", "Tanh", "Softmax", "Elu", "Gelu", "Selu"):
            other[node.op_type] = other.get(node.op_type, 0) + 1
    return {"relus": total, "relu_nodes": per_node, "maxpool_comparisons": maxpool_cmp, "other_nonlinear_ops": other}

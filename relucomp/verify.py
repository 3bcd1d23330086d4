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

def onnx_relu_count(model_or_path, *, include_maxpool: bool = False) -> dict[str, Any]:
    """Count ReLU elements and every comparison per image in an ONNX model from the graph itself.

    A view of :func:`relucomp.onnx_graph.walk` (the one ONNX walker): ``relus``
    (Relu elements), ``relu_nodes``, ``comparisons`` / ``comparisons_by_op``
    (every comparison-bearing op), ``budgeted_comparisons`` (all but MaxPool
    unless ``include_maxpool``), ``maxpool_comparisons``, ``other_nonlinear_ops``.
    """
    from .onnx_graph import walk

    c = walk(model_or_path, include_maxpool=include_maxpool)
    return {k: c[k] for k in ("relus", "relu_nodes", "comparisons", "comparisons_by_op", "budgeted_comparisons",
                              "maxpool_comparisons", "other_nonlinear_ops", "uncounted")}

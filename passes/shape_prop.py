"""ShapeAnalysisPass: per-sample shapes, ReLU counts and MACs (analysis only).

Writes, for every node, ``meta["relucomp"]["shape"]`` (output shape without
the batch dimension) and, where relevant:

* ReLU-like nodes: ``relus`` (elements per image) and ``relus_kept`` (after
  gating; equal to ``relus`` for a plain ReLU);
* ``Conv{1,2,3}d``: ``macs = out_elems * in_channels/groups * prod(kernel)``;
* ``Linear``: ``macs = prod(out_shape) * in_features``;
* ``MaxPool``: ``maxpool_comparisons = out_elems * (prod(kernel) - 1)`` —
  a nonlinearity PI pays for as well.

It needs an example input (shape ``(N, C, H, W)``) and runs the graph once
with fx's interpreter; it never changes the graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from relucomp.infra import AnalysisPass
from relucomp.ir import meta, module_of, relu_kind
from relucomp.nn import ReLUGate, SparseReLU


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        m = meta(n)
        if isinstance(out, torch.Tensor):
            m["shape"] = tuple(out.shape[1:]) if out.dim() > 0 else ()
        else:
            m.pop("shape", None)
        return out


class ShapeAnalysisPass(AnalysisPass):
    def __init__(self, example_input: torch.Tensor):
        self.example_input = example_input

    def analyze(self, gm: fx.GraphModule) -> dict[str, Any]:
        was = gm.training
        gm.eval()
        with torch.no_grad():
            _Recorder(gm).run(self.example_input)
        gm.train(was)
        total = kept = macs = cmp = 0
        for n in gm.graph.nodes:
            m = meta(n)
            shape = m.get("shape")
            kind = relu_kind(gm, n)
            for key in ("relus", "relus_kept", "macs", "maxpool_comparisons"):
                m.pop(key, None)
            if kind is not None and shape is not None:
                m["relus"] = _numel(shape)
                mod = module_of(gm, n)
                if isinstance(mod, ReLUGate):
                    m["relus_kept"] = mod.kept_relus()
                    m["site"] = m.get("site") or mod.site
                    m["kind"] = "gate"
                elif isinstance(mod, SparseReLU):
                    m["relus_kept"] = mod.kept_relus
                    m["kind"] = "sparse_relu"
                else:
                    m["relus_kept"] = m["relus"]
                    m["kind"] = "relu"
                total += m["relus"]
                kept += m["relus_kept"]
                continue
            mod = module_of(gm, n)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and shape is not None:
                m["kind"] = "conv"
                m["macs"] = _numel(shape) * (mod.in_channels // mod.groups) * _numel(mod.kernel_size)
            elif isinstance(mod, nn.Linear) and shape is not None:
                m["kind"] = "linear"
                m["macs"] = _numel(shape) * mod.in_features
            elif isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and shape is not None:
                k = mod.kernel_size if isinstance(mod.kernel_size, tuple) else (mod.kernel_size,) * (len(shape) - 1)
                m["kind"] = "maxpool"
                m["maxpool_comparisons"] = _numel(shape) * (_numel(k) - 1)
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                m["kind"] = "bn"
            elif n.op == "call_function" and n.target is torch.nn.functional.max_pool2d and shape is not None:
                k = n.args[1] if len(n.args) > 1 else n.kwargs.get("kernel_size")
                k = (k, k) if isinstance(k, int) else tuple(k)
                m["kind"] = "maxpool"
                m["maxpool_comparisons"] = _numel(shape) * (_numel(k) - 1)
            macs += m.get("macs", 0)
            cmp += m.get("maxpool_comparisons", 0)
        return {"relus": total, "relus_kept": kept, "macs": macs, "maxpool_comparisons": cmp}


def layer_table(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Per-layer rows (ReLU sites, convs, linears, pools) from the metadata."""
    rows = []
    for n in gm.graph.nodes:
        m = n.meta.get("relucomp", {})
        kind = m.get("kind")
        if kind in ("relu", "gate", "sparse_relu"):
            rows.append({"name": m.get("site", n.name), "kind": kind, "shape": list(m.get("shape", ())),
                         "relus": m.get("relus", 0), "relus_kept": m.get("relus_kept", 0), "macs": 0})
        elif kind in ("conv", "linear"):
            rows.append({"name": str(n.target), "kind": kind, "shape": list(m.get("shape", ())),
                         "relus": 0, "relus_kept": 0, "macs": m.get("macs", 0)})
        elif kind == "maxpool":
            rows.append({"name": str(n.target), "kind": kind, "shape": list(m.get("shape", ())),
                         "relus": 0, "relus_kept": 0, "macs": 0,
                         "maxpool_comparisons": m.get("maxpool_comparisons", 0)})
    return rows

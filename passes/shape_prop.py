"""ShapeAnalysisPass: per-sample shapes, ReLU counts and MACs (analysis only).

Writes, for every node, ``meta["relucomp"]["shape"]`` (output shape without
the batch dimension) and, where relevant:

* ReLU-like nodes: ``relus`` (elements per image) and ``relus_kept`` (after
  gating; equal to ``relus`` for a plain ReLU);
* ``Conv{1,2,3}d``: ``macs = out_elems * in_channels/groups * prod(kernel)``;
* ``Linear``: ``macs = prod(out_shape) * in_features``;
* ``MaxPool``: ``maxpool_comparisons = out_elems * (prod(kernel) - 1)`` —
  a nonlinearity PI pays for as well;
* every other comparison-bearing node (ReLU6 / hardtanh / clamp: one
  comparison per bound per element; LeakyReLU, PReLU, ELU, GELU, SiLU,
  Sigmoid, Tanh...: one per element; Hardswish / Hardsigmoid: two;
  ``maximum`` / ``minimum``: one; ``max`` / ``argmax`` / adaptive max pools:
  inputs − outputs; ``topk``, ``sort``) and every opaque ``call_module``
  (a user leaf module, counted by running it under
  :class:`relucomp.ir.NonlinearityCounter`): ``comparisons`` (per image, not
  gateable), ``nonlinearities`` ({op kind: comparisons}) and, for ReLUs
  hidden in such nodes, ``hidden_relus`` — they count in ``relus`` but
  relucomp cannot gate them.  ``kind`` is ``"nonlinear"`` (``"maxpool"`` for
  pools, ``"leaf"`` for opaque modules).

It needs an example input (shape ``(N, C, H, W)``) and runs the graph once
with fx's interpreter; it never changes the graph.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx, nn

from relucomp.infra import AnalysisPass
from relucomp.ir import NonlinearityCounter, meta, module_of, relu_kind
from relucomp.nn import ReLUGate, SparseReLU


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


_STRUCTURAL = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.Identity,
               nn.Flatten, nn.Dropout, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
               nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, batch: int):
        super().__init__(gm)
        self.batch = max(1, batch)

    def run_node(self, n: fx.Node) -> Any:
        m = meta(n)
        m.pop("nonlinearities", None)
        if n.op in ("placeholder", "output", "get_attr") or relu_kind(self.module, n) is not None or isinstance(
                module_of(self.module, n), (ReLUGate, SparseReLU, *_STRUCTURAL)):
            out = super().run_node(n)
        else:  # any other call: count what it evaluates (the whole body of an opaque leaf module)
            counter = NonlinearityCounter()
            with counter:
                out = super().run_node(n)
            found: dict[str, int] = {}
            for op, c in counter.found:
                found[op] = found.get(op, 0) + c
            if found:
                m["nonlinearities"] = {op: -(-c // self.batch) for op, c in found.items()}
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
            _Recorder(gm, int(self.example_input.shape[0])).run(self.example_input)
        gm.train(was)
        total = kept = macs = cmp = other = hidden = 0
        ops: dict[str, int] = {}
        for n in gm.graph.nodes:
            m = meta(n)
            shape = m.get("shape")
            kind = relu_kind(gm, n)
            for key in ("relus", "relus_kept", "macs", "maxpool_comparisons", "comparisons", "hidden_relus"):
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
            found = m.get("nonlinearities")
            if found:
                pool = found.get("maxpool", 0) + sum(v for k, v in found.items() if k.startswith("adaptive_max_pool"))
                m["comparisons"] = sum(found.values()) - pool
                if pool:
                    m["maxpool_comparisons"] = pool
                if found.get("relu"):
                    m["hidden_relus"] = m["relus"] = m["relus_kept"] = found["relu"]
                    total += m["relus"]
                    kept += m["relus_kept"]
                    hidden += m["relus"]
                if mod is not None and not isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)) and (
                        type(mod).__module__.split(".")[0] != "torch" or len(list(mod.children())) > 0):
                    m["kind"] = "leaf"
                elif pool and not m["comparisons"]:
                    m["kind"] = "maxpool"
                else:
                    m["kind"] = "nonlinear"
                m["op"] = ", ".join(sorted(found))
                cmp += pool
                other += m["comparisons"]
                for k, v in found.items():
                    ops[k] = ops.get(k, 0) + v
                continue
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and shape is not None:
                m["kind"] = "conv"
                m["macs"] = _numel(shape) * (mod.in_channels // mod.groups) * _numel(mod.kernel_size)
            elif isinstance(mod, nn.Linear) and shape is not None:
                m["kind"] = "linear"
                m["macs"] = _numel(shape) * mod.in_features
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                m["kind"] = "bn"
            elif m.get("kind") in ("maxpool", "nonlinear", "leaf"):
                m.pop("kind")
            macs += m.get("macs", 0)
        return {"relus": total, "relus_kept": kept, "macs": macs, "maxpool_comparisons": cmp,
                "hidden_relus": hidden, "comparisons": other, "nonlinearities": ops}


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
        elif kind in ("maxpool", "nonlinear", "leaf"):
            rows.append({"name": str(n.target) if n.op == "call_module" else n.name, "kind": kind,
                         "shape": list(m.get("shape", ())), "relus": m.get("relus", 0),
                         "relus_kept": m.get("relus_kept", 0), "macs": 0,
                         "maxpool_comparisons": m.get("maxpool_comparisons", 0),
                         "comparisons": m.get("comparisons", 0), "hidden_relus": m.get("hidden_relus", 0),
                         "op": m.get("op", ""), "nonlinearities": dict(m.get("nonlinearities", {}))})
    return rows


def ungated_comparisons(gm: fx.GraphModule, *, include_maxpool: bool = False) -> dict[str, Any]:
    """Comparisons per image that no gate controls (from ShapeAnalysisPass's metadata).

    ``{"total": int, "by_node": [{"name", "kind", "op", "comparisons"}...]}``:
    ReLUs hidden in opaque nodes (leaf modules, un-canonicalizable forms),
    ReLU6 / clamp / hardtanh bounds, other activations, max/min, sorting,
    and — with ``include_maxpool`` — MaxPool comparisons.
    """
    by_node = []
    for row in layer_table(gm):
        if row["kind"] not in ("maxpool", "nonlinear", "leaf"):
            continue
        c = row["comparisons"] + (row["maxpool_comparisons"] if include_maxpool else 0)
        if c > 0:
            by_node.append({"name": row["name"], "kind": row["kind"], "op": row["op"], "comparisons": c,
                            "hidden_relus": row["hidden_relus"]})
    return {"total": sum(r["comparisons"] for r in by_node), "by_node": by_node}

"""MaxPoolToAvgPoolPass: replace MaxPool by AvgPool of the same geometry (NOT semantics preserving).

A k×k MaxPool costs ``k·k − 1`` comparisons per output element in private
inference — each one a ReLU-class protocol (``max(a, b) = b + relu(a − b)``) —
while an AvgPool is linear (free up to a public scale).  As in DeepReDuce /
SNL practice, the MaxPools are swapped for AvgPools and the finetune that
follows recovers the accuracy.  ``nn.MaxPool{1,2,3}d`` modules and
``F.max_pool{1,2,3}d`` calls are replaced, with the same kernel, stride and
padding (``count_include_pad=False``, so padded borders average only real
inputs).  Pools with dilation > 1 or ``return_indices`` are left alone.

``preserves_semantics = False``: the PassManager only lints the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of

_MAX = {nn.MaxPool1d: nn.AvgPool1d, nn.MaxPool2d: nn.AvgPool2d, nn.MaxPool3d: nn.AvgPool3d}
_FMAX = {F.max_pool1d: nn.AvgPool1d, F.max_pool2d: nn.AvgPool2d, F.max_pool3d: nn.AvgPool3d}
_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _dilated(d) -> bool:
    return any(v != 1 for v in (d if isinstance(d, (tuple, list)) else (d,)))


def _avg_for(kind: type, kernel_size, stride, padding, ceil_mode) -> nn.Module:
    return kind(kernel_size, stride=stride if stride not in (None, ()) else kernel_size, padding=padding,
                ceil_mode=bool(ceil_mode), count_include_pad=False)


class MaxPoolToAvgPoolPass(Pass):
    preserves_semantics = False

    def call(self, gm: fx.GraphModule) -> PassResult:
        replaced: list[str] = []
        skipped: list[str] = []
        for node in list(gm.graph.nodes):
            mod = module_of(gm, node)
            if mod is not None and type(mod) in _MAX:
                if _dilated(mod.dilation) or mod.return_indices:
                    skipped.append(f"{node.target}: dilation/return_indices")
                    continue
                avg = _avg_for(_MAX[type(mod)], mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode)
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, avg)
                meta(node)["kind"] = "avgpool"
                meta(node)["replaced_maxpool"] = True
                replaced.append(str(node.target))
            elif node.op == "call_function" and node.target in _FMAX:
                bound = dict(zip(_ARGS, node.args[1:]))
                bound.update(node.kwargs)
                if _dilated(bound.get("dilation", 1)) or bound.get("return_indices", False):
                    skipped.append(f"{node.name}: dilation/return_indices")
                    continue
                avg = _avg_for(_FMAX[node.target], bound["kernel_size"], bound.get("stride"), bound.get("padding", 0),
                               bound.get("ceil_mode", False))
                name = f"relucomp_avgpool_{node.name}"
                gm.add_submodule(name, avg)
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_module(name, (node.args[0],))
                new.meta.update(node.meta)
                meta(new)["kind"] = "avgpool"
                meta(new)["replaced_maxpool"] = True
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                replaced.append(node.name)
        return PassResult(gm, bool(replaced), {"replaced": replaced, "skipped": skipped})


def replace_maxpool(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Apply :class:`MaxPoolToAvgPoolPass` and refresh the shape/count metadata."""
    from relucomp.infra import PassManager
    from relucomp.passes.shape_prop import ShapeAnalysisPass

    return PassManager([MaxPoolToAvgPoolPass(), ShapeAnalysisPass(example[:1])], calibration=example).run(gm).gm

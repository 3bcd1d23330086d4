"""CanonicalizeReLUPass: every ReLU spelling becomes one node kind.

``nn.ReLU`` modules (in-place or not, shared or not), ``F.relu``, ``F.relu_``,
``torch.relu``, ``torch.relu_``, ``x.relu()`` and ``x.relu_()`` all become an
out-of-place ``call_function torch.relu`` node carrying a stable site name in
``node.meta["relucomp"]["site"]`` (the module path for module ReLUs, with
``#k`` for the k-th reuse of a shared module; the node name otherwise).

Exact ReLU equivalents are canonicalized too, so they are gated and counted
like any ReLU: ``torch.clamp(x, min=0)`` / ``x.clamp(min=0)`` / ``clip``
(no upper bound), ``clamp_min(x, 0)``, ``F.threshold(x, 0, 0)`` /
``nn.Threshold(0, 0)``, ``F.hardtanh(x, 0, inf)`` / ``nn.Hardtanh(0, inf)``
and ``leaky_relu(x, 0)`` / ``nn.LeakyReLU(0)`` (see
:func:`relucomp.ir.is_relu_equivalent`).  Forms that only approximate a ReLU
(``relu6``, ``clamp(min=c≠0)``, ...) are left alone; ShapeAnalysisPass counts
their comparisons.

In-place forms mutate their input in eager mode, so later readers of the
input saw the rectified tensor: those uses are redirected to the new node,
which keeps the semantics while removing the mutation.
"""

from __future__ import annotations

import torch
from torch import fx

from relucomp.infra import Pass, PassResult
from relucomp.ir import (call_is_inplace, is_canonical_relu, is_raw_relu, is_relu_equivalent, meta, module_call,
                         module_of, node_order, replace_all_uses_after)


def _is_torch_callable(target) -> bool:
    mod = getattr(target, "__module__", None) or ""
    return mod == "torch" or mod.startswith(("torch.", "torch._C"))


def relu_equivalent_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node computing exactly ``relu`` of its first input, in any spelling."""
    if is_raw_relu(gm, node):
        return True
    if node.op == "call_module":
        call = module_call(module_of(gm, node))
        return call is not None and is_relu_equivalent(call[0], (None, *call[1]), call[2])
    if node.op == "call_function" and _is_torch_callable(node.target):
        return is_relu_equivalent(node.target, node.args, node.kwargs)
    if node.op == "call_method":
        return is_relu_equivalent(node.target, node.args, node.kwargs)
    return False


class CanonicalizeReLUPass(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        order = node_order(gm)
        seen_targets: dict[str, int] = {}
        converted = 0
        named = 0
        # site names must be unique (gates are keyed by site): a function ReLU's
        # node name can equal a ReLU module's path (``torch.relu`` node "relu"
        # and a module ``self.relu``), so clashes get a ``#k`` suffix.
        used = {meta(n)["site"] for n in gm.graph.nodes if is_canonical_relu(n) and "site" in meta(n)}

        def fresh(base: str) -> str:
            site, k = base, 0
            while site in used:
                k += 1
                site = f"{base}#{k}"
            used.add(site)
            return site

        for node in list(gm.graph.nodes):
            if is_canonical_relu(node) and not node.kwargs:
                if "site" not in meta(node):
                    meta(node)["site"] = fresh(node.name)
                    meta(node)["kind"] = "relu"
                    named += 1
                continue
            if not relu_equivalent_node(gm, node) or not node.args:
                continue
            inplace = False
            if node.op == "call_module":
                mod = module_of(gm, node)
                inplace = bool(getattr(mod, "inplace", False))
                k = seen_targets.get(node.target, 0)
                seen_targets[node.target] = k + 1
                site = node.target if k == 0 else f"{node.target}#{k}"
            else:  # call_function / call_method
                inplace = call_is_inplace(node.target, node.args, node.kwargs)
                site = node.name
            src = node.args[0]
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.relu, (src,))
            node.replace_all_uses_with(new)
            new.meta.update({k: v for k, v in node.meta.items()})
            meta(new)["site"] = meta(node)["site"] if "site" in meta(node) else fresh(site)
            meta(new)["kind"] = "relu"
            gm.graph.erase_node(node)
            order = node_order(gm)
            if inplace and isinstance(src, fx.Node):
                replace_all_uses_after(src, new, new, order)
            converted += 1
        modified = converted > 0 or named > 0
        return PassResult(gm, modified, {"converted": converted})

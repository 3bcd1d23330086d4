"""LowerGatesPass: turn binarized gates into the ops a PI runtime should see.

For every *hard* :class:`~relucomp.nn.ReLUGate` (after the budget search):

* mask all 0 → the gate is removed (identity; the region is linear and can be
  folded into its neighbours by :class:`ComposeAffinePass`);
* mask all 1 → a plain ``torch.relu``;
* otherwise → :class:`~relucomp.nn.SparseReLU` that applies ReLU only to the
  kept elements (``form="sparse"``, the default), or the gate is left in its
  mask form (``form="mask"``: ``where(mask, relu(x), x)``, which a 2PC runtime
  still pays for in full).

Soft (still-training) gates are left alone.  Semantics are preserved exactly.
"""

from __future__ import annotations

import torch
from torch import fx

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of
from relucomp.nn import ReLUGate, SparseReLU


def sparse_from_gate(gate: ReLUGate) -> SparseReLU:
    mask = gate.mask.detach()[0]  # drop broadcast batch dim
    if gate.granularity == "channel" and len(gate.act_shape) > 1:
        keep = torch.nonzero(mask.reshape(mask.shape[0], -1)[:, 0] > 0.5).flatten()
        return SparseReLU(keep, gate.act_shape, by_channel=True)
    full = mask.expand(gate.act_shape).reshape(-1)
    keep = torch.nonzero(full > 0.5).flatten()
    return SparseReLU(keep, gate.act_shape, by_channel=False)


class LowerGatesPass(Pass):
    def __init__(self, form: str = "sparse"):
        if form not in ("sparse", "mask"):
            raise ValueError("form must be 'sparse' or 'mask'")
        self.form = form

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = to_relu = to_sparse = 0
        for node in list(gm.graph.nodes):
            gate = module_of(gm, node)
            if not isinstance(gate, ReLUGate) or not bool(gate.hard):
                continue
            kept = int(gate.mask.sum().item())
            src = node.args[0]
            if kept == 0:
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                removed += 1
                continue
            if kept == gate.mask.numel():
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(torch.relu, (src,))
                to_relu += 1
            elif self.form == "sparse":
                sparse = sparse_from_gate(gate)
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent), attr, sparse)
                meta(node)["kind"] = "sparse_relu"
                to_sparse += 1
                continue
            else:
                continue
            new.meta.update(node.meta)
            meta(new)["kind"] = "relu"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        modified = bool(removed or to_relu or to_sparse)
        if modified:
            gm.delete_all_unused_submodules()
        return PassResult(gm, modified, {"removed": removed, "to_relu": to_relu, "to_sparse": to_sparse})

"""LowerGatesPass: turn binarized gates into the ops a PI runtime should see.

For every *hard* :class:`~relucomp.nn.ReLUGate` (after the budget search):

* mask all 0 → the gate is removed (identity; the region is linear and can be
  folded into its neighbours by :class:`ComposeAffinePass`);
* mask all 1 → a plain ``torch.relu``;
* otherwise → :class:`~relucomp.nn.SparseReLU` that applies ReLU only to the
  kept elements (``form="sparse"``, the default), or the gate is left in its
  mask form (``form="mask"``: ``where(mask, relu(x), x)``, which a 2PC runtime
  still pays for in full).

When the gate has a non-trivial linear replacement (``rep_scale``/``rep_shift``
≠ 1/0), the kept-ReLU op is followed by an
:class:`~relucomp.nn.ElementwiseAffine` with ``scale = 1, shift = 0`` at kept
elements and ``s, b`` (per channel) at linearized ones.  That is exact because
the ReLU op passes linearized elements through unchanged, and it adds no
comparison.  With ``fold=True`` (default) the affine is then folded into the
neighbouring conv / BN wherever that is exact
(:class:`~relucomp.passes.compose_affine.FoldElementwiseAffinePass`).

Soft (still-training) gates are left alone.  Semantics are preserved exactly.
"""

from __future__ import annotations

import torch
from torch import fx

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of
from relucomp.nn import ElementwiseAffine, ReLUGate, SparseReLU


def affine_from_gate(gate: ReLUGate) -> ElementwiseAffine | None:
    """The elementwise affine a hard gate's linearized elements need (None: identity)."""
    if not gate.has_replacement():
        return None
    mask = gate.mask.detach()
    s, b = gate.rep_scale.detach(), gate.rep_shift.detach()
    if len(gate.act_shape) == 1:
        s, b = s.reshape(1, -1), b.reshape(1, -1)
    uniform = gate.granularity != "pixel"  # channel / layer masks are constant over each channel
    if uniform:
        m = mask.expand(s.shape) if mask.dim() == s.dim() else mask.reshape(s.shape)
    else:
        m = mask
        s, b = s.expand(m.shape), b.expand(m.shape)
    one = torch.ones_like(s)
    scale = torch.where(m.bool(), one, s)
    shift = torch.where(m.bool(), torch.zeros_like(b), b)
    if bool(torch.all(scale == 1)) and bool(torch.all(shift == 0)):
        return None
    if not uniform:  # a pixel gate whose kept pattern is constant per channel: keep it per channel
        c = scale.shape[1]
        flat_s, flat_b = scale.reshape(c, -1), shift.reshape(c, -1)
        if bool(torch.all(flat_s == flat_s[:, :1])) and bool(torch.all(flat_b == flat_b[:, :1])):
            shape = (1, c, *([1] * (scale.dim() - 2)))
            scale, shift = flat_s[:, 0].reshape(shape), flat_b[:, 0].reshape(shape)
    return ElementwiseAffine(scale, shift)


def sparse_from_gate(gate: ReLUGate) -> SparseReLU:
    mask = gate.mask.detach()[0]  # drop broadcast batch dim
    if gate.granularity == "channel" and len(gate.act_shape) > 1:
        keep = torch.nonzero(mask.reshape(mask.shape[0], -1)[:, 0] > 0.5).flatten()
        return SparseReLU(keep, gate.act_shape, by_channel=True)
    full = mask.expand(gate.act_shape).reshape(-1)
    keep = torch.nonzero(full > 0.5).flatten()
    return SparseReLU(keep, gate.act_shape, by_channel=False)


class LowerGatesPass(Pass):
    def __init__(self, form: str = "sparse", fold: bool = True):
        if form not in ("sparse", "mask"):
            raise ValueError("form must be 'sparse' or 'mask'")
        self.form = form
        self.fold = fold

    def _add_affine(self, gm: fx.GraphModule, node: fx.Node, after: fx.Node, aff: ElementwiseAffine) -> None:
        """Insert ``aff`` after ``after`` and route ``after``'s users through it."""
        parent, _, attr = str(node.target).rpartition(".")
        container = gm.get_submodule(parent) if parent else gm
        name = f"{attr}_affine"
        i = 0
        while hasattr(container, name):
            i += 1
            name = f"{attr}_affine{i}"
        container.add_module(name, aff)
        users = list(after.users)
        with gm.graph.inserting_after(after):
            new = gm.graph.call_module(f"{parent}.{name}" if parent else name, (after,))
        new.meta.update({k: v for k, v in after.meta.items() if k != "relucomp"})
        meta(new).update({k: v for k, v in meta(after).items() if k in ("shape", "site")})
        meta(new)["kind"] = "affine_replacement"
        meta(new)["relus"] = 0
        for u in users:
            u.replace_input_with(after, new)

    def call(self, gm: fx.GraphModule) -> PassResult:
        removed = to_relu = to_sparse = affines = 0
        for node in list(gm.graph.nodes):
            gate = module_of(gm, node)
            if not isinstance(gate, ReLUGate) or not bool(gate.hard):
                continue
            kept = int(gate.mask.sum().item())
            src = node.args[0]
            aff = affine_from_gate(gate) if (kept < gate.mask.numel() and not (self.form == "mask" and kept > 0)) else None
            if kept == 0:
                if aff is not None:
                    self._add_affine(gm, node, node, aff)
                    affines += 1
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
                if aff is not None:
                    self._add_affine(gm, node, node, aff)
                    affines += 1
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
        stats = {"removed": removed, "to_relu": to_relu, "to_sparse": to_sparse}
        if affines:
            stats["affine_replacements"] = affines
        if modified:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
            if affines and self.fold:
                from relucomp.passes.compose_affine import FoldElementwiseAffinePass

                stats["affine_fold"] = FoldElementwiseAffinePass().call(gm).stats
        return PassResult(gm, modified, stats)

"""FoldBatchNormPass: fold an inference-mode BatchNorm into the preceding conv/linear.

For ``y = BN(conv(x))`` with running statistics ``mu``, ``var``, affine
``gamma``, ``beta`` and ``eps``, per output channel ``c``::

    s_c   = gamma_c / sqrt(var_c + eps)
    W'_c  = s_c * W_c                      (W_c: all weights producing channel c)
    b'_c  = s_c * (b_c - mu_c) + beta_c    (b_c = 0 if the conv has no bias)

so ``conv'(x) == BN(conv(x))`` exactly in real arithmetic.  The same holds for
``Linear`` followed by ``BatchNorm1d`` (channel = output feature).

Not folded (negative cases): a BN in training mode (its output depends on the
batch statistics), a BN without running statistics, a conv/linear whose output
has other users besides the BN, a conv module called from several nodes, and a
linear whose output is not known (from ShapeAnalysisPass metadata) to be
``(N, features)`` — on ``(N, L, F)`` BatchNorm1d normalizes ``L``, not ``F``.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of

AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold_bn_into(affine: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Return a copy of ``affine`` with ``bn`` folded into its weight and bias."""
    fused = copy.deepcopy(affine)
    with torch.no_grad():
        w = fused.weight
        scale = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        if isinstance(fused, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            raise TypeError("transposed convolutions are not folded")
        w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))))
        b = fused.bias if fused.bias is not None else torch.zeros_like(bn.running_mean)
        new_b = (b - bn.running_mean) * scale + shift
        fused.bias = nn.Parameter(new_b.detach().clone())
    return fused


class FoldBatchNormPass(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        folded = 0
        skipped: list[str] = []
        for bn_node in list(gm.graph.nodes):
            bn = module_of(gm, bn_node)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            src = bn_node.args[0] if bn_node.args else None
            aff = module_of(gm, src) if isinstance(src, fx.Node) else None
            if not isinstance(aff, AFFINE):
                continue
            if bn.training or not bn.track_running_stats or bn.running_mean is None:
                skipped.append(f"{bn_node.target}: training mode / no running stats")
                continue
            if len(src.users) != 1 or calls[src.target] != 1 or calls[bn_node.target] != 1:
                skipped.append(f"{bn_node.target}: producer output is shared")
                continue
            if isinstance(aff, nn.Linear) and len(meta(src).get("shape") or (0, 0)) != 1:
                # BatchNorm1d normalizes dim 1: that is the linear's feature dim only for (N, F) outputs
                skipped.append(f"{bn_node.target}: linear output is not known to be (N, features)")
                continue
            out_ch = aff.out_channels if hasattr(aff, "out_channels") else aff.out_features
            if bn.num_features != out_ch:
                skipped.append(f"{bn_node.target}: channel mismatch")
                continue
            fused = fold_bn_into(aff, bn)
            parent, _, attr = src.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
            bn_node.replace_all_uses_with(src)
            meta(src)["folded_bn"] = str(bn_node.target)
            gm.graph.erase_node(bn_node)
            folded += 1
        if folded:
            gm.delete_all_unused_submodules()
        return PassResult(gm, folded > 0, {"folded": folded, "skipped": skipped})

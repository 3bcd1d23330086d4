"""ComposeAffinePass: merge adjacent affine ops with no nonlinearity between them.

Once ReLUs are linearized and BatchNorms folded, chains like conv→conv or
linear→linear are a single affine map and can be one op.

Linear∘linear: ``W = W2 @ W1``, ``b = W2 @ b1 + b2`` (always exact).

Conv2d∘Conv2d (``groups=1``, ``dilation=1``, zero padding): with conv1 of
kernel k1, stride s1, padding p1 and conv2 of kernel k2, stride s2, padding p2,
the composition is one conv with kernel ``K = k1 + (k2-1)*s1``, stride
``s1*s2``, padding ``p1 + p2*s1`` and::

    W[o,i, a*s1+u, b*s1+v] += sum_m W2[o,m,a,b] * W1[m,i,u,v]
    bias[o] = b2[o] + sum_{m,a,b} W2[o,m,a,b] * b1[m]

This is exact only when the zero padding conv2 adds to the intermediate
tensor equals what conv1 would compute on the extended border, i.e. when
``p2 == 0``, or when conv1 is a bias-free 1×1 conv with ``p1 == 0``.  Other
cases are skipped (negative case).  A composition is applied only when it does
not raise MACs (``policy="macs"``, the default: in PI linear layers cost
homomorphic work) or always (``policy="always"``: fewer ops).
The intermediate must have exactly one user.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv_composable(c1: nn.Conv2d, c2: nn.Conv2d) -> bool:
    for c in (c1, c2):
        if c.groups != 1 or _pair(c.dilation) != (1, 1) or c.padding_mode != "zeros" or isinstance(c.padding, str):
            return False
    if c2.in_channels != c1.out_channels:
        return False
    if _pair(c2.padding) == (0, 0):
        return True
    one_by_one = _pair(c1.kernel_size) == (1, 1) and _pair(c1.padding) == (0, 0)
    return one_by_one and (c1.bias is None or bool(torch.all(c1.bias == 0)))


def compose_conv(c1: nn.Conv2d, c2: nn.Conv2d) -> nn.Conv2d:
    (k1h, k1w), (s1h, s1w), (p1h, p1w) = _pair(c1.kernel_size), _pair(c1.stride), _pair(c1.padding)
    (k2h, k2w), (s2h, s2w), (p2h, p2w) = _pair(c2.kernel_size), _pair(c2.stride), _pair(c2.padding)
    kh, kw = k1h + (k2h - 1) * s1h, k1w + (k2w - 1) * s1w
    fused = nn.Conv2d(c1.in_channels, c2.out_channels, (kh, kw), stride=(s1h * s2h, s1w * s2w),
                      padding=(p1h + p2h * s1h, p1w + p2w * s1w), bias=True)
    w1, w2 = c1.weight.detach().double(), c2.weight.detach().double()
    w = torch.zeros(c2.out_channels, c1.in_channels, kh, kw, dtype=torch.float64)
    for a in range(k2h):
        for b in range(k2w):
            w[:, :, a * s1h: a * s1h + k1h, b * s1w: b * s1w + k1w] += torch.einsum("om,miuv->oiuv", w2[:, :, a, b], w1)
    bias = c2.bias.detach().double() if c2.bias is not None else torch.zeros(c2.out_channels, dtype=torch.float64)
    if c1.bias is not None:
        bias = bias + torch.einsum("omab,m->o", w2, c1.bias.detach().double())
    with torch.no_grad():
        fused.weight.copy_(w.to(c1.weight.dtype))
        fused.bias.copy_(bias.to(c1.weight.dtype))
    return fused


def compose_linear(l1: nn.Linear, l2: nn.Linear) -> nn.Linear:
    fused = nn.Linear(l1.in_features, l2.out_features, bias=True)
    w1, w2 = l1.weight.detach().double(), l2.weight.detach().double()
    b = l2.bias.detach().double() if l2.bias is not None else torch.zeros(l2.out_features, dtype=torch.float64)
    if l1.bias is not None:
        b = b + w2 @ l1.bias.detach().double()
    with torch.no_grad():
        fused.weight.copy_((w2 @ w1).to(l1.weight.dtype))
        fused.bias.copy_(b.to(l1.weight.dtype))
    return fused


class ComposeAffinePass(Pass):
    def __init__(self, policy: str = "macs"):
        if policy not in ("macs", "always"):
            raise ValueError("policy must be 'macs' or 'always'")
        self.policy = policy

    def _macs(self, node: fx.Node, conv: nn.Conv2d, out_shape) -> int | None:
        if out_shape is None:
            return None
        hw = 1
        for d in out_shape[1:]:
            hw *= d
        return conv.out_channels * hw * conv.in_channels * _pair(conv.kernel_size)[0] * _pair(conv.kernel_size)[1]

    def call(self, gm: fx.GraphModule) -> PassResult:
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        composed = 0
        skipped = 0
        changed = True
        while changed:
            changed = False
            for n2 in list(gm.graph.nodes):
                m2 = module_of(gm, n2)
                if not isinstance(m2, (nn.Conv2d, nn.Linear)) or not n2.args:
                    continue
                n1 = n2.args[0]
                m1 = module_of(gm, n1) if isinstance(n1, fx.Node) else None
                if type(m1) is not type(m2) or len(n1.users) != 1 or calls[n1.target] != 1 or calls[n2.target] != 1:
                    continue
                if isinstance(m2, nn.Conv2d):
                    if not conv_composable(m1, m2):
                        skipped += 1
                        continue
                    fused = compose_conv(m1, m2)
                    if self.policy == "macs":
                        s1, s2 = meta(n1).get("shape"), meta(n2).get("shape")
                        before = (self._macs(n1, m1, s1) or 0) + (self._macs(n2, m2, s2) or 0)
                        after = self._macs(n2, fused, s2)
                        if s1 is None or s2 is None or after is None or after > before:
                            skipped += 1
                            continue
                else:
                    if m1.out_features != m2.in_features:
                        continue
                    fused = compose_linear(m1, m2)
                    if self.policy == "macs" and m1.in_features * m2.out_features > m1.in_features * m1.out_features + m1.out_features * m2.out_features:
                        skipped += 1
                        continue
                parent, _, attr = n2.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
                n2.replace_input_with(n1, n1.args[0])
                meta(n2)["composed_from"] = [str(n1.target), str(n2.target)]
                gm.graph.erase_node(n1)
                calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
                composed += 1
                changed = True
                break
        if composed:
            gm.delete_all_unused_submodules()
        return PassResult(gm, composed > 0, {"composed": composed, "skipped": skipped})


# ---------------------------------------------------------------------------
# linear replacements of removed ReLUs (ElementwiseAffine) → neighbouring conv/BN
# ---------------------------------------------------------------------------

def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, mod)


def _channel_vectors(aff) -> tuple[torch.Tensor, torch.Tensor]:
    return aff.scale.reshape(-1).double(), aff.shift.reshape(-1).double()


class FoldElementwiseAffinePass(Pass):
    """Fold per-channel :class:`~relucomp.nn.ElementwiseAffine` ops (linear replacements) into a conv/BN.

    With ``y = s ⊙ x + t`` per channel, after a gate lowered to a ReLU op that
    passes linearized elements through unchanged (identity, ``SparseReLU``) and
    ``s = 1, t = 0`` at kept elements:

    * **previous** (preferred): the affine moves before the ReLU op and into the
      producer ``P`` of the pre-activation (Conv/Linear: ``W'_c = s_c·W_c``,
      ``b'_c = s_c·b_c + t_c``; BatchNorm: ``γ'_c = s_c·γ_c``, ``β'_c = s_c·β_c + t_c``)
      — exact because the ReLU op is the identity wherever ``(s, t) ≠ (1, 0)``.
      Needs ``P`` to be called once and to have the gate as its only user.
    * **next**: the affine's only user is a Conv2d (``groups=1``) or Linear:
      ``W'[:, c] = s_c·W[:, c]``, ``b' = b + Σ W[:, c]·t_c`` — exact only when
      ``t = 0`` or the conv has no zero padding (padding would see ``0``, not
      ``t``).
    * otherwise (per-pixel affine, residual adds, shared producers) it stays an
      elementwise Mul + Add — a linear op, no comparison.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        from relucomp.nn import ElementwiseAffine, SparseReLU

        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        folded_prev = folded_next = kept = 0
        for node in list(gm.graph.nodes):
            aff = module_of(gm, node)
            if not isinstance(aff, ElementwiseAffine):
                continue
            if not aff.per_channel:
                kept += 1
                continue
            s, t = _channel_vectors(aff)
            src = node.args[0]
            relu_op = module_of(gm, src) if isinstance(src, fx.Node) else None
            pre = src.args[0] if isinstance(relu_op, SparseReLU) else src
            if isinstance(relu_op, SparseReLU) and len(src.users) != 1:
                pre = None
            prod = module_of(gm, pre) if isinstance(pre, fx.Node) else None
            if (prod is not None and calls[pre.target] == 1 and len(pre.users) == 1
                    and self._fold_into_producer(gm, pre, prod, s, t)):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                folded_prev += 1
                continue
            users = list(node.users)
            cons = module_of(gm, users[0]) if len(users) == 1 else None
            if cons is not None and calls[users[0].target] == 1 and self._fold_into_consumer(gm, users[0], cons, s, t):
                node.replace_all_uses_with(src)
                gm.graph.erase_node(node)
                folded_next += 1
                continue
            kept += 1
        if folded_prev or folded_next:
            gm.graph.lint()
            gm.delete_all_unused_submodules()
            gm.recompile()
        return PassResult(gm, bool(folded_prev or folded_next),
                          {"folded_into_previous": folded_prev, "folded_into_next": folded_next,
                           "kept_elementwise": kept})

    @staticmethod
    def _fold_into_producer(gm, pre: fx.Node, prod: nn.Module, s: torch.Tensor, t: torch.Tensor) -> bool:
        import copy

        if isinstance(prod, nn.modules.batchnorm._BatchNorm):
            if not prod.affine or prod.num_features != s.numel():
                return False
            new = copy.deepcopy(prod)
            with torch.no_grad():
                new.weight.copy_((prod.weight.double() * s).to(prod.weight.dtype))
                new.bias.copy_((prod.bias.double() * s + t).to(prod.bias.dtype))
        elif isinstance(prod, (nn.Conv2d, nn.Linear)):
            out_ch = prod.out_channels if isinstance(prod, nn.Conv2d) else prod.out_features
            if out_ch != s.numel():
                return False
            if isinstance(prod, nn.Linear) and len(meta(pre).get("shape") or (0, 0)) != 1:
                return False
            new = copy.deepcopy(prod)
            with torch.no_grad():
                w = prod.weight.double()
                new.weight.copy_((w * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
                b = prod.bias.double() if prod.bias is not None else torch.zeros_like(s)
                new.bias = nn.Parameter((b * s + t).to(prod.weight.dtype))
        else:
            return False
        _set_module(gm, str(pre.target), new)
        meta(pre)["folded_affine_replacement"] = True
        return True

    @staticmethod
    def _fold_into_consumer(gm, user: fx.Node, cons: nn.Module, s: torch.Tensor, t: torch.Tensor) -> bool:
        import copy

        if isinstance(cons, nn.Conv2d):
            if cons.groups != 1 or cons.in_channels != s.numel() or cons.padding_mode != "zeros":
                return False
            if bool(torch.any(t != 0)) and (isinstance(cons.padding, str) or _pair(cons.padding) != (0, 0)):
                return False
            w = cons.weight.double()
            new = copy.deepcopy(cons)
            with torch.no_grad():
                new.weight.copy_((w * s.reshape(1, -1, 1, 1)).to(cons.weight.dtype))
                b = cons.bias.double() if cons.bias is not None else torch.zeros(cons.out_channels, dtype=torch.float64)
                new.bias = nn.Parameter((b + torch.einsum("ocuv,c->o", w, t)).to(cons.weight.dtype))
        elif isinstance(cons, nn.Linear):
            if cons.in_features != s.numel() or len(meta(user).get("shape") or (0, 0)) != 1:
                return False
            w = cons.weight.double()
            new = copy.deepcopy(cons)
            with torch.no_grad():
                new.weight.copy_((w * s.reshape(1, -1)).to(cons.weight.dtype))
                b = cons.bias.double() if cons.bias is not None else torch.zeros(cons.out_features, dtype=torch.float64)
                new.bias = nn.Parameter((b + w @ t).to(cons.weight.dtype))
        else:
            return False
        _set_module(gm, str(user.target), new)
        meta(user)["folded_affine_replacement"] = True
        return True

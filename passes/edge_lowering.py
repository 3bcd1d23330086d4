"""EdgeLoweringPass: the plaintext-optimal form of every partially linearized layer.

The ``edge`` export target runs in plain onnxruntime (no 2PC), where moving
data costs more than the ReLUs it saves: the PI-ready forms of
:mod:`relucomp.passes.pi_lowering` (Gather/Slice/Concat around the kept
ReLUs) made pixel-gated resnet8 3.4–7× slower than the dense export.  Here a
partial layer becomes **one elementwise op**, :class:`MaskedReLU`::

    y = Max(x, x · s)        s = 0 where the ReLU is kept, 1 where it was removed

(``s`` per element for pixel gates, ``[C, 1, 1]`` for channel gates): kept
elements get ``max(x, 0)``, removed ones ``max(x, x) = x`` — the same function
as the gate.  Candidates were measured in onnxruntime 1.32 (after a 3×3 conv,
resnet8's three activation shapes, 1 and 2 threads, batch 1 and 64, interleaved
medians; ``benchmarks/results/export.json`` → ``elementwise_forms``):
``PRelu(x, s)`` (one op, but onnxruntime's broadcasting PRelu kernel is slow:
+26–63 % over the fused conv+relu at b64 in the first measurement),
``Where(m, Relu(x), x)`` (slowest), ``x − m·min(x, 0)`` (three ops) and
``Max(x, x·s)`` (two vectorized streaming ops) — the last is the fastest in 11 of
the 12 settings (idle rerun with thread-pool spinning off: 1.02–1.17× a fused
conv+relu layer), so it is the form.  None matches the
fused conv+relu of a dense layer: onnxruntime also inserts NCHWc layout reorders
around ops its NCHWc transformer does not handle (``Mul`` by a constant, ``Max``).

Fully linearized layers were already removed by
:class:`~relucomp.passes.lower_gates.LowerGatesPass` and their affine
neighbours composed by :class:`~relucomp.passes.compose_affine.ComposeAffinePass`;
fully kept layers are plain ``relu`` (which onnxruntime fuses into the conv).

Channel gates of a conv feature map get :class:`ChannelMaskedReLU` instead,
``x + Relu(DepthwiseConv1×1(x; −m))`` (m = 1 kept / 0 removed): onnxruntime's
NCHWc transformer handles a depthwise conv (Relu fused) and ``Add``, so no layout
reorders are inserted; per layer 1.01–1.16× a fused conv+relu, where the channel form of
``Max(x, x·s)`` is 1.06–1.21× (``export.json`` → ``elementwise_forms``); resnet8 with
channel gates 1.11–1.24× dense, with pixel gates 1.25–1.47× (idle, spinning off).  Pixel gates have no such form: NCHWc ``Mul``/``Add`` need both
operands produced in NCHWc, and a per-element constant mask is not, so the pixel
form keeps the reorders (``edge ≤ 1.0× dense`` is out of reach for pixel masks
in default onnxruntime: no fused conv activation takes a per-element parameter).

This target is **plaintext**: ``Max`` is comparison-bearing, so the PI
budget check on the ONNX graph does not apply to it (the export's metadata says
``export_target = edge``).  Semantics are preserved exactly.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of
from relucomp.nn import ReLUGate, SparseReLU, keep_mask


class MaskedReLU(SparseReLU):
    """ReLU on the kept elements, identity on the rest, as ``Max(x, x·s)`` (see the module docstring).

    A :class:`SparseReLU` subclass (so counting, tracing and shape analysis treat it
    as before; ``keep`` still lists the kept indices).  ``slope`` has the
    activation's per-sample shape (pixel gates) or ``[C, 1, …]`` (channel gates); ``s`` is
    0 where the ReLU is kept, 1 where it was removed.
    """

    form = "maxmul"

    def __init__(self, keep: torch.Tensor, act_shape: Sequence[int], by_channel: bool = False):
        super().__init__(keep, act_shape, by_channel)
        n = self.act_shape[0] if by_channel else math.prod(self.act_shape)
        shape = (self.act_shape[0], *([1] * (len(self.act_shape) - 1))) if by_channel else self.act_shape
        slope = torch.ones(n)
        slope[self.keep] = 0.0
        self.register_buffer("slope", slope.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exported as ONNX Mul + Max (the fastest measured elementwise form, see the module docstring)
        return torch.maximum(x, x * self.slope.to(x.dtype))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", form=maxmul"


class ChannelMaskedReLU(MaskedReLU):
    """A channel-gated partial layer of a conv feature map as ``x + Relu(DepthwiseConv1×1(x; −m))``.

    ``m`` = 1 for a kept channel, 0 for a removed one: kept channels give
    ``x + max(−x, 0) = max(x, 0)`` and removed ones ``x + max(−0·x, 0) = x`` — exactly,
    in floating point too (``x + (−x)`` is exactly 0).  Exported as ONNX
    ``Conv(group=C, 1×1) → Relu → Add``: onnxruntime runs all three in its NCHWc
    layout (a depthwise conv with the Relu fused, and an NCHWc ``Add``), so the layer
    costs two streaming passes and no layout reorders, where ``Max(x, x·s)`` costs
    ``Mul`` + ``Max`` + a ``ReorderOutput``/``ReorderInput`` pair (neither ``Mul`` by a
    constant nor ``Max`` has an NCHWc kernel).  Measured faster than ``Max(x, x·s)`` in
    every setting (``benchmarks/results/export.json`` → ``elementwise_forms``).
    """

    form = "dwadd"

    def __init__(self, keep: torch.Tensor, act_shape: Sequence[int]):
        super().__init__(keep, act_shape, by_channel=True)
        c = self.act_shape[0]
        w = torch.zeros(c)
        w[self.keep] = -1.0
        self.register_buffer("neg_kept", w.reshape(c, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(F.conv2d(x, self.neg_kept.to(x.dtype), groups=x.shape[1]))

    def extra_repr(self) -> str:
        return SparseReLU.extra_repr(self) + ", form=dwadd"


def edge_module(keep: torch.Tensor, act_shape: Sequence[int], by_channel: bool) -> MaskedReLU:
    """The measured-fastest edge form of one partial layer: :class:`ChannelMaskedReLU` for channel gates
    of a 2-D feature map (``act_shape`` = (C, H, W)), :class:`MaskedReLU` (``Max(x, x·s)``) otherwise."""
    if by_channel and len(act_shape) == 3:
        return ChannelMaskedReLU(keep, act_shape)
    return MaskedReLU(keep, act_shape, by_channel)


class EdgeLoweringPass(Pass):
    """Lower every partial ReLU layer (plain :class:`SparseReLU` or hard gate) to :func:`edge_module`
    (:class:`ChannelMaskedReLU` for channel gates of conv feature maps, :class:`MaskedReLU` otherwise).

    Other nodes are left alone (e.g. an elementwise affine a replacement adds after
    the kept-ReLU op), so the pass composes with them.  Layers whose module is
    called from several nodes are lowered once (the module is shared).
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        replaced, done = 0, {}
        layers = []
        for node in list(gm.graph.nodes):
            if node.op != "call_module":
                continue
            mod = module_of(gm, node)
            if type(mod) is not SparseReLU and not isinstance(mod, ReLUGate):
                continue
            if isinstance(mod, ReLUGate) and getattr(mod, "rep_scale", None) is not None:
                continue  # a gate with a learned replacement: LowerGatesPass lowers it (kept-ReLU op + affine) first
            info = keep_mask(mod)
            if info is None:
                continue
            mask, act_shape, by_channel = info
            k = int(mask.sum())
            if node.target not in done:
                if k == mask.numel():
                    continue  # all kept: LowerGatesPass makes these plain relu
                new = edge_module(torch.nonzero(mask).flatten(), act_shape, by_channel)
                parent, _, attr = node.target.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, new)
                done[node.target] = new
                replaced += 1
                layers.append({"site": meta(node).get("site", node.name), "kept": new.kept_relus,
                               "by_channel": by_channel, "form": new.form})
            meta(node)["kind"] = "sparse_relu"
            meta(node)["edge_form"] = done[node.target].form
        return PassResult(gm, replaced > 0, {"layers": layers, "lowered": replaced})

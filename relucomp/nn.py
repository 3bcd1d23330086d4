"""Modules relucomp inserts into the IR.

* :class:`ReLUGate` — a learnable SNL gate replacing one ReLU site:
  ``y = a·relu(x) + (1 − a)·(s·x + b)`` with ``a`` in [0, 1] (``a = 1``: ReLU,
  ``a = 0``: the linear replacement ``s·x + b``).  ``a`` has one entry per
  pixel (C×H×W, as in SNL), per channel or per layer; the replacement
  ``s`` = ``rep_scale``, ``b`` = ``rep_shift`` is per channel (init 1 / 0, so
  the gate starts as SNL's ``x + a·(relu(x) − x)``; frozen at 1 / 0 with
  ``replacement="identity"``).  A linearized element costs no comparison in
  PI: ``s·x + b`` is a linear op, folded into a neighbouring conv/BN when the
  structure allows (:class:`~relucomp.passes.compose_affine.FoldElementwiseAffinePass`).
  During the search ``mask`` marks entries *pinned* linear (0); the forward
  uses ``a·mask`` but the gradient still reaches a pinned entry's ``a`` (a
  straight-through shadow score), so a pinned entry can re-open.  Once
  binarized (``hard``) the gate applies ReLU exactly where its 0/1 ``mask`` is
  1.  All state is in parameters/buffers, so a state_dict restores it.
* :class:`ElementwiseAffine` — ``x·scale + shift`` with constant (buffer)
  tensors broadcast over the batch: what a linearized element becomes.
* :class:`SparseReLU` — the PI-ready form of a partially linearized layer: the
  ReLU is evaluated only on the kept elements (gather → relu → concat with the
  linear elements → gather back into place), so the exported graph's ReLU
  input has exactly ``len(keep)`` elements per image.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

GRANULARITIES = ("pixel", "channel", "layer")
REPLACEMENTS = ("affine", "identity")


def gate_shape(act_shape: Sequence[int], granularity: str) -> tuple[int, ...]:
    """Shape of the gate tensor for an activation of per-sample shape ``act_shape``.

    The returned shape includes a leading broadcast batch dimension of 1.
    """
    act_shape = tuple(int(s) for s in act_shape)
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {GRANULARITIES}")
    if granularity == "pixel":
        return (1, *act_shape)
    if granularity == "channel":
        if len(act_shape) == 0:
            return (1,)
        return (1, act_shape[0], *([1] * (len(act_shape) - 1)))
    return (1, *([1] * len(act_shape)))


class ReLUGate(nn.Module):
    """Learnable ReLU/identity gate (SNL).  See the module docstring."""

    def __init__(self, act_shape: Sequence[int], granularity: str = "pixel", site: str = "",
                 replacement: str = "identity"):
        super().__init__()
        if replacement not in REPLACEMENTS:
            raise ValueError(f"unknown replacement {replacement!r}; choose one of {REPLACEMENTS}")
        shape = gate_shape(act_shape, granularity)
        self.granularity = granularity
        self.site = site
        self.act_shape = tuple(int(s) for s in act_shape)
        self.alpha = nn.Parameter(torch.ones(shape))
        self.register_buffer("mask", torch.ones(shape))
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool))
        rshape = gate_shape(act_shape, "channel")
        self.rep_scale = nn.Parameter(torch.ones(rshape), requires_grad=replacement == "affine")
        self.rep_shift = nn.Parameter(torch.zeros(rshape), requires_grad=replacement == "affine")

    @property
    def replacement(self) -> str:
        return "affine" if self.rep_scale.requires_grad else "identity"

    def has_replacement(self) -> bool:
        """True when the linear replacement is not the identity."""
        return bool(torch.any(self.rep_scale != 1) or torch.any(self.rep_shift != 0))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints written before linear replacements existed: identity replacement
        for name, fill in (("rep_scale", 1.0), ("rep_shift", 0.0)):
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.full_like(getattr(self, name), fill)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    # -- counting -----------------------------------------------------------
    @property
    def elements_per_gate(self) -> int:
        """How many activation elements (ReLUs) one gate entry controls."""
        return math.prod(self.act_shape) // self.alpha.numel()

    @property
    def total_relus(self) -> int:
        return math.prod(self.act_shape)

    def kept_relus(self, threshold: float = 1e-2) -> int:
        """ReLUs this gate evaluates: hard mask count, or soft entries above ``threshold``."""
        if bool(self.hard):
            n = int(self.mask.sum().item())
        else:
            n = int(((self.alpha.detach().clamp(0.0, 1.0) * self.mask) > threshold).sum().item())
        return n * self.elements_per_gate

    # -- state --------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self) -> None:
        """Project ``a`` to [0, 1] once hard, to the score range [−1, 2] while searching."""
        if bool(self.hard):
            self.alpha.clamp_(0.0, 1.0)
        else:
            self.alpha.clamp_(-1.0, 2.0)

    @torch.no_grad()
    def pin_linear_(self, entries: torch.Tensor) -> None:
        """Pin the given flat gate entries linear (their ``a`` becomes a shadow score)."""
        self.mask.view(-1)[entries] = 0.0

    @torch.no_grad()
    def unpin_(self, entries: torch.Tensor) -> None:
        """Re-open pinned entries (hysteresis)."""
        self.mask.view(-1)[entries] = 1.0

    #: set by the search during its recovery plateau: the forward is the binarized gate (live → ReLU,
    #: pinned → linear) while the scores keep learning (straight-through)
    straight: bool = False

    def effective_alpha(self) -> torch.Tensor:
        """The gate value used in the forward, with straight-through gradients to the score ``a``.

        ``a`` is a score in [−1, 2]; the forward uses ``clamp(a, 0, 1)`` for live entries (0 for
        pinned ones, 1 for live ones during the plateau) but the gradient reaches ``a`` unclipped, so
        entries saturated at 0 or 1 keep being ranked by their evidence instead of tying.
        """
        if bool(self.hard) or not self.alpha.requires_grad:
            return self.alpha.clamp(0.0, 1.0) * self.mask
        a = self.alpha
        value = self.mask if self.straight else a.clamp(0.0, 1.0) * self.mask
        return a + (value - a).detach()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Binarize: fix the gate to ``mask`` (broadcastable 0/1)."""
        self.mask.copy_(mask.to(self.mask.dtype).expand_as(self.mask))
        self.alpha.copy_(self.mask)
        self.alpha.requires_grad_(False)
        self.hard.fill_(True)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        s, b = self.rep_scale, self.rep_shift
        if x.dim() != s.dim():  # (N, F) activations: per-feature replacement
            s, b = s.reshape(1, -1), b.reshape(1, -1)
        return torch.addcmul(b, s, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        affine = self.rep_scale.requires_grad or self.has_replacement()
        if bool(self.hard):
            return torch.where(self.mask.bool(), torch.relu(x), self._linear(x) if affine else x)
        a = self.effective_alpha()
        if not affine:
            # x + a·(relu(x) − x) == x − a·min(x, 0): two fused kernels instead of four
            return torch.addcmul(x, a, torch.clamp(x, max=0.0), value=-1.0)
        lin = self._linear(x)
        return torch.addcmul(lin, a, torch.relu(x) - lin)

    def extra_repr(self) -> str:
        return (f"site={self.site!r}, granularity={self.granularity}, act_shape={self.act_shape}, "
                f"hard={bool(self.hard)}, replacement={self.replacement}")


class ElementwiseAffine(nn.Module):
    """``y = x·scale + shift`` with constant tensors (a linearized ReLU's replacement; no comparison).

    ``scale`` / ``shift`` have a leading broadcast batch dim of 1 (per-element
    ``(1, C, H, W)`` or per-channel ``(1, C, 1, 1)``).  Exports as Mul + Add.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("shift", shift.detach().clone().float())

    @property
    def per_channel(self) -> bool:
        return all(d == 1 for d in self.scale.shape[2:]) and all(d == 1 for d in self.shift.shape[2:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scale.shape)}"


class SparseReLU(nn.Module):
    """ReLU on the kept elements only; identity elsewhere (PI-ready lowering).

    ``keep`` indexes the flattened per-sample activation (or its channels when
    ``by_channel``).  Forward: ``z = cat(relu(x[:, keep]), x[:, drop])[:, inverse]``.
    Exported to ONNX this is Gather → Relu → Concat → Gather, so a 2PC runtime
    evaluates ``len(keep) * elements_per_index`` ReLUs and nothing more.
    """

    def __init__(self, keep: torch.Tensor, act_shape: Sequence[int], by_channel: bool = False):
        super().__init__()
        self.act_shape = tuple(int(s) for s in act_shape)
        self.by_channel = by_channel
        n = self.act_shape[0] if by_channel else math.prod(self.act_shape)
        keep = torch.as_tensor(keep, dtype=torch.long).flatten().sort().values
        is_kept = torch.zeros(n, dtype=torch.bool)
        is_kept[keep] = True
        drop = torch.nonzero(~is_kept).flatten()
        order = torch.cat([keep, drop])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n)
        self.register_buffer("keep", keep)
        self.register_buffer("drop", drop)
        self.register_buffer("inverse", inverse)

    @property
    def kept_relus(self) -> int:
        per = math.prod(self.act_shape[1:]) if self.by_channel else 1
        return int(self.keep.numel()) * per

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.by_channel:
            kept = torch.relu(torch.index_select(x, 1, self.keep))
            rest = torch.index_select(x, 1, self.drop)
            return torch.index_select(torch.cat([kept, rest], 1), 1, self.inverse)
        flat = torch.flatten(x, 1)
        kept = torch.relu(torch.index_select(flat, 1, self.keep))
        rest = torch.index_select(flat, 1, self.drop)
        out = torch.index_select(torch.cat([kept, rest], 1), 1, self.inverse)
        return out.reshape((-1,) + self.act_shape)  # a constant shape: the export's per-image shape is static

    def extra_repr(self) -> str:
        return f"kept={self.kept_relus}, act_shape={self.act_shape}, by_channel={self.by_channel}"


def keep_mask(mod: nn.Module) -> tuple[torch.Tensor, tuple[int, ...], bool] | None:
    """(1-D keep mask, act_shape, by_channel) of a :class:`SparseReLU` or a hard :class:`ReLUGate`; None otherwise.

    The mask indexes the flattened per-sample activation (pixel) or its channels
    (``by_channel``); the lowering passes (pi, edge) read a layer's kept ReLUs from it.
    """
    if isinstance(mod, SparseReLU):
        n = mod.act_shape[0] if mod.by_channel else math.prod(mod.act_shape)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[mod.keep] = True
        return mask, mod.act_shape, mod.by_channel
    if isinstance(mod, ReLUGate) and bool(mod.hard):
        m = mod.mask.detach()[0] > 0.5
        if mod.granularity == "channel" and len(mod.act_shape) > 1:
            return m.reshape(m.shape[0], -1)[:, 0].clone(), mod.act_shape, True
        return m.expand(mod.act_shape).reshape(-1).clone(), mod.act_shape, False
    return None


LEAF_MODULES: tuple[type[nn.Module], ...] = (ReLUGate, SparseReLU, ElementwiseAffine)

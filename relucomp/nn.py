"""Modules relucomp inserts into the IR.

* :class:`ReLUGate` — a learnable SNL gate replacing one ReLU site:
  ``y = x + a * (relu(x) - x)`` with ``a`` in [0, 1] (``a = 1``: ReLU, ``a = 0``:
  identity).  ``a`` has one entry per pixel (C×H×W, as in SNL), per channel or
  per layer.  Once binarized (``hard``) the gate applies ReLU exactly where its
  0/1 ``mask`` is 1.  All state is in parameters/buffers, so a state_dict
  restores it (checkpoint/resume).
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

    def __init__(self, act_shape: Sequence[int], granularity: str = "pixel", site: str = ""):
        super().__init__()
        shape = gate_shape(act_shape, granularity)
        self.granularity = granularity
        self.site = site
        self.act_shape = tuple(int(s) for s in act_shape)
        self.alpha = nn.Parameter(torch.ones(shape))
        self.register_buffer("mask", torch.ones(shape))
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool))

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
            n = int((self.alpha.detach() > threshold).sum().item())
        return n * self.elements_per_gate

    # -- state --------------------------------------------------------------
    @torch.no_grad()
    def clamp_(self) -> None:
        """Project ``a`` to [0, 1]; entries pinned linear (``mask == 0``) stay at 0."""
        self.alpha.clamp_(0.0, 1.0)
        if not bool(self.hard):
            self.alpha.mul_(self.mask)

    @torch.no_grad()
    def pin_linear_(self, entries: torch.Tensor) -> None:
        """Fix the given flat gate entries to identity for the rest of the search."""
        self.mask.view(-1)[entries] = 0.0
        self.alpha.view(-1)[entries] = 0.0

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Binarize: fix the gate to ``mask`` (broadcastable 0/1)."""
        self.mask.copy_(mask.to(self.mask.dtype).expand_as(self.mask))
        self.alpha.copy_(self.mask)
        self.alpha.requires_grad_(False)
        self.hard.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(self.hard):
            return torch.where(self.mask.bool(), torch.relu(x), x)
        # x + a·(relu(x) − x) == x − a·min(x, 0): two fused kernels instead of four
        return torch.addcmul(x, self.alpha, torch.clamp(x, max=0.0), value=-1.0)

    def extra_repr(self) -> str:
        return f"site={self.site!r}, granularity={self.granularity}, act_shape={self.act_shape}, hard={bool(self.hard)}"


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
        return out.reshape(x.shape)

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


LEAF_MODULES: tuple[type[nn.Module], ...] = (ReLUGate, SparseReLU)

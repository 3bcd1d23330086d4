"""PILoweringPass: choose, per partially linearized layer, the cheapest PI-ready form.

Input: a graph whose partial layers are :class:`~relucomp.nn.SparseReLU` (what
:class:`~relucomp.passes.lower_gates.LowerGatesPass` emits) or hard
:class:`~relucomp.nn.ReLUGate` s.  Every form applies ``Relu`` to exactly the kept
elements (one ``Relu`` node whose input has ``kept`` elements per image), so a
2PC runtime evaluates exactly the budget; they differ in how data is moved
around that ``Relu``, which is not free under 2PC either.  Measured with
SPU 0.9.5 (Cheetah, 2 cores, loopback; see ``relucomp/pi/cost_model.json``):
a ReLU costs ≈15–20 µs, an element moved by ``Gather`` ≈1.1 µs (SPU gathers
scalar by scalar), a ``Where`` with a constant condition ≈60 ns per element
(with its constant), a ``Slice``/``Concat`` ~ns per element — and every op
≈0.2 ms (SPU parses and dispatches the program op by op on every run), so
forms with many small ops lose.

Forms (all are :class:`SparseReLU` subclasses, so counting and tracing treat
them as before):

``gather``        the existing SparseReLU: gather kept → Relu → concat → gather
                  back (2·n gathered elements).
``runs``          :class:`RunsReLU`: contiguous runs of kept / linear elements
                  become ``Slice`` s: ``Relu(Concat(kept runs))`` then one
                  ``Concat`` puts every run back in place.  Cheap when the mask
                  has few runs (channel masks: at most one run per channel).
``compact``       :class:`CompactReLU`: a compaction network — ⌈log2(n−k)⌉ stages
                  of ``roll`` + ``Where`` (constant condition) move the kept
                  elements to the front without any gather, ``Relu`` on the first
                  ``k``, and the mirrored network moves them back.  For unstructured
                  pixel masks.
``channel_perm``  channel gates whose producer is a conv used only by the gate
                  and whose consumers are convs: the kept channels are moved to
                  the front by permuting the producer's output channels and the
                  consumers' input channels (folded into the weights, free at run
                  time); the layer becomes ``Concat(Relu(x[:, :k]), x[:, k:])``
                  (:class:`PrefixReLU`).

``pixel_perm``    pixel masks with the same foldable producer/consumer convs as
                  ``channel_perm``: the channels are reordered by kept count
                  (fully kept first, fully linear last; folded into the
                  weights) so fully kept / linear channels merge into single
                  runs; then the cheapest of ``gather`` / ``runs`` / ``compact``
                  on the reordered mask (reported as ``perm+<form>``).

The cost of each applicable form is computed from the coefficients in
``cost_model.json["lowering"]`` (defaults below) and the cheapest wins
(``forms`` restricts the choice, e.g. ``forms=("gather",)`` reproduces the old
lowering).  The pass preserves semantics exactly.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.ir import meta, module_of
from relucomp.nn import SparseReLU, keep_mask

FORMS = ("gather", "runs", "compact", "channel_perm", "pixel_perm")

#: seconds; calibrated by benchmarks/bench_pi.py into relucomp/pi/cost_model.json["lowering"]
DEFAULT_COEFFS = {
    "gather_element_s": 1.1e-6,   # one element through SPU's Gather (scalar by scalar)
    "select_element_s": 6e-8,     # one element through one compaction stage (roll + Where + its constant)
    "copy_element_s": 3e-9,       # one element through Slice/Concat/Reshape
    "op_s": 1.8e-4,               # fixed cost of one op: SPU re-reads the program on every run
}


def lowering_coefficients(path: str | Path | None = None) -> dict[str, float]:
    """The data-movement cost coefficients (``cost_model.json["lowering"]``, else defaults)."""
    if path is None:
        import relucomp.pi

        path = Path(relucomp.pi.__file__).with_name("cost_model.json")
    coeffs = dict(DEFAULT_COEFFS)
    try:
        coeffs.update({k: float(v) for k, v in json.loads(Path(path).read_text()).get("lowering", {}).items()
                       if k in coeffs})
    except (OSError, ValueError):
        pass
    return coeffs


# ---------------------------------------------------------------------------
# mask helpers
# ---------------------------------------------------------------------------

def runs_of(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, kept)`` of a 1-D bool mask."""
    m = mask.to(torch.bool).flatten().tolist()
    out: list[tuple[int, int, bool]] = []
    start = 0
    for i in range(1, len(m) + 1):
        if i == len(m) or m[i] != m[start]:
            out.append((start, i, bool(m[start])))
            start = i
    return out


def compaction_stages(mask: torch.Tensor) -> tuple[list[tuple[int, torch.Tensor]], list[tuple[int, torch.Tensor]]]:
    """Stages of the compaction network for a 1-D keep mask.

    Kept element ``i`` (at position ``p_i``) must move left by ``d_i = p_i − i``;
    processing the bits of ``d_i`` from the lowest, stage ``j`` moves the
    elements whose bit ``j`` is set by ``2**j``.  Positions stay distinct and in
    order after every stage (``(a mod m) − (b mod m) ≤ a − b`` for ``a ≥ b``), so
    one ``Where`` per stage suffices.  Returns (compaction, expansion) stages as
    ``(shift, condition)``; the condition marks the destinations that take the
    shifted value.  Expansion replays the compaction backwards, moving right.
    """
    m = mask.to(torch.bool).flatten()
    n = m.numel()
    keep = torch.nonzero(m).flatten()
    k = keep.numel()
    d = keep - torch.arange(k)
    pos = keep.clone()
    comp: list[tuple[int, torch.Tensor]] = []
    history: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    j = 0
    while k and int(d.max()) >> j:
        s = 1 << j
        moving = ((d >> j) & 1).bool()
        if bool(moving.any()):
            cond = torch.zeros(n, dtype=torch.bool)
            cond[pos[moving] - s] = True
            comp.append((s, cond))
            history.append((s, moving.clone(), pos.clone()))
            pos = torch.where(moving, pos - s, pos)
        j += 1
    exp: list[tuple[int, torch.Tensor]] = []
    for s, moving, before in reversed(history):
        cond = torch.zeros(n, dtype=torch.bool)
        cond[before[moving]] = True  # after moving right by s they are back where they were before the stage
        exp.append((s, cond))
    return comp, exp


# ---------------------------------------------------------------------------
# PI-ready modules (SparseReLU subclasses: counting / tracing / ShapeAnalysis unchanged)
# ---------------------------------------------------------------------------

class RunsReLU(SparseReLU):
    """ReLU on the kept runs only, with ``Slice``/``Concat`` (no gathers)."""

    form = "runs"

    def __init__(self, keep: torch.Tensor, act_shape: Sequence[int], by_channel: bool = False):
        super().__init__(keep, act_shape, by_channel)
        n = self.act_shape[0] if by_channel else math.prod(self.act_shape)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.keep] = True
        self.runs = runs_of(mask)

    @property
    def n_ops(self) -> int:
        return sum(2 if kept else 1 for _, _, kept in self.runs) + 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if self.by_channel else torch.flatten(x, 1)
        kept = [flat[:, a:b] for a, b, k in self.runs if k]
        r = torch.relu(kept[0] if len(kept) == 1 else torch.cat(kept, 1))
        parts, off = [], 0
        for a, b, k in self.runs:
            if k:
                parts.append(r[:, off:off + (b - a)])
                off += b - a
            else:
                parts.append(flat[:, a:b])
        out = torch.cat(parts, 1)
        return out if self.by_channel else out.reshape((-1,) + self.act_shape)  # constant shape: exports static

    def extra_repr(self) -> str:
        return super().extra_repr() + f", form=runs, runs={len(self.runs)}"


class CompactReLU(SparseReLU):
    """Pixel masks without gathers: blocked compaction network → Relu on the kept → expansion network.

    The flattened activation is viewed as ``R = n / block`` rows of ``block``
    elements.  Within every row a compaction network (see
    :func:`compaction_stages`, one ``roll`` + ``Where`` per stage, ≤ log2(block)
    stages, all rows at once) moves the row's kept elements to its front; the
    ``Relu`` input is the concatenation of those row prefixes (one ``Slice``
    per row); the outputs are put back as row prefixes (``Slice``/``Concat``)
    and the mirrored network returns them to their places; a final ``Where``
    restores the linear elements.  ``block = n`` is the plain network.
    """

    form = "compact"

    def __init__(self, keep: torch.Tensor, act_shape: Sequence[int], block: int | None = None):
        super().__init__(keep, act_shape, by_channel=False)
        n = math.prod(self.act_shape)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[self.keep] = True
        block = int(block or n)
        if n % block:
            raise ValueError(f"block {block} does not divide the activation size {n}")
        self.block = block
        rows = mask.reshape(-1, block)
        self.row_kept = [int(v) for v in rows.sum(1).tolist()]
        stages = [compaction_stages(r) for r in rows]
        depth_c = max((len(c) for c, _ in stages), default=0)
        # stage i of every row uses the same shift (2**j for the j-th set bit level); align by shift value
        shifts = sorted({s for c, _ in stages for s, _ in c})
        comp = []
        for s in shifts:
            cond = torch.stack([next((cc for ss, cc in c if ss == s), torch.zeros(block, dtype=torch.bool))
                                for c, _ in stages])
            comp.append((s, cond))
        exp = [(s, torch.stack([next((cc for ss, cc in e if ss == s), torch.zeros(block, dtype=torch.bool))
                                for _, e in stages])) for s in reversed(shifts)]
        del depth_c
        self.register_buffer("keep_mask", mask)
        self.comp_shifts = [s for s, _ in comp]
        self.exp_shifts = [s for s, _ in exp]
        for i, (_, c) in enumerate(comp):
            self.register_buffer(f"comp_cond{i}", c)
        for i, (_, c) in enumerate(exp):
            self.register_buffer(f"exp_cond{i}", c)

    @property
    def stages(self) -> int:
        return len(self.comp_shifts) + len(self.exp_shifts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        flat = torch.flatten(x, 1)
        n = math.prod(self.act_shape)
        rows = n // b
        cur = flat.reshape(-1, rows, b)
        for i, s in enumerate(self.comp_shifts):
            shifted = torch.cat([cur[:, :, s:], cur[:, :, :s]], 2)  # shifted[q] = cur[q + s]
            cur = torch.where(getattr(self, f"comp_cond{i}"), shifted, cur)
        if rows == 1:
            k = self.row_kept[0]
            cur = torch.cat([torch.relu(cur[:, 0, :k]), cur[:, 0, k:]], 1)
        else:
            cf = cur.reshape(-1, n)
            pre = [cf[:, r * b: r * b + k] for r, k in enumerate(self.row_kept) if k]
            act = torch.relu(pre[0] if len(pre) == 1 else torch.cat(pre, 1))
            parts, off = [], 0
            for r, k in enumerate(self.row_kept):
                if k:
                    parts.append(act[:, off:off + k])
                    off += k
                if k < b:
                    parts.append(cf[:, r * b + k:(r + 1) * b])
            cur = torch.cat(parts, 1)
        cur = cur.reshape(-1, rows, b)
        for i, s in enumerate(self.exp_shifts):
            shifted = torch.cat([cur[:, :, b - s:], cur[:, :, :b - s]], 2)  # shifted[q] = cur[q − s]
            cur = torch.where(getattr(self, f"exp_cond{i}"), shifted, cur)
        return torch.where(self.keep_mask, cur.reshape(-1, n), flat).reshape((-1,) + self.act_shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", form=compact, block={self.block}, stages={self.stages}"


class PrefixReLU(SparseReLU):
    """ReLU on the first ``k`` channels (the kept channels, moved there by permuting the convs)."""

    form = "channel_perm"

    def __init__(self, k: int, act_shape: Sequence[int]):
        super().__init__(torch.arange(int(k)), act_shape, by_channel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.keep.numel())
        return torch.cat([torch.relu(x[:, :k]), x[:, k:]], 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", form=channel_perm"


# ---------------------------------------------------------------------------
# costs
# ---------------------------------------------------------------------------

def form_costs(mask: torch.Tensor, act_shape: Sequence[int], by_channel: bool, coeffs: dict[str, float],
               perm_ok: bool = False) -> dict[str, float]:
    """Estimated data-movement seconds per image of each applicable form (the ReLUs are the same in all)."""
    g, e, c, o = (coeffs[k] for k in ("gather_element_s", "select_element_s", "copy_element_s", "op_s"))
    n = math.prod(act_shape)
    runs = runs_of(mask)
    n_runs_kept = sum(1 for r in runs if r[2])
    costs = {"gather": g * 2 * n + c * n + 8 * o,  # 3 gathers (+ index constants), concat, reshapes
             "runs": o * (len(runs) + n_runs_kept + 4) + c * 2 * n}
    if by_channel:
        if perm_ok:
            costs["channel_perm"] = 3 * o + c * n
    else:
        block, cost = best_block(mask, coeffs)
        costs["compact"] = cost
    return costs


def compact_nodes(stages: int, n_rows: int) -> int:
    """ONNX nodes :class:`CompactReLU` exports to (constants included — ``op_s`` is fitted per ONNX node).

    A ``Slice`` carries four ``Constant`` inputs (starts, ends, axes, steps): 5 nodes.  A stage is a roll
    (2 slices + ``Concat``) and a ``Where`` (its condition is an initializer): 12 nodes.  Rows: 3 slices each
    (the kept prefix into the ``Relu``, the result and the rest back), or 2 for a single row.  Fixed: flatten,
    the reshapes and their shape constants, the ``Relu``, 2 concats, the final ``Where`` (one reshape fewer and
    a row ``Gather`` for a single row).  Tested against the export node by node.
    """
    if n_rows > 1:
        return 12 * stages + 5 * 3 * n_rows + 15
    return 12 * stages + 5 * 2 + 14


def compact_cost(mask: torch.Tensor, block: int, coeffs: dict[str, float]) -> float:
    """Estimated seconds of :class:`CompactReLU` with rows of ``block`` elements.

    Every exported node is priced at ``op_s`` (as the fit counts them), every element of every stage at
    ``select_element_s``.  Counting only the stage ops (5 per stage, as before session 13) priced the form at a
    third of its nodes and chose it over ``gather`` where ``pi.json`` measured it slower (all-compact
    pixel-18432: 1.12 s against 0.95 s with public weights)."""
    e, c, o = coeffs["select_element_s"], coeffs["copy_element_s"], coeffs["op_s"]
    m = mask.to(torch.bool).flatten()
    n = m.numel()
    rows = m.reshape(-1, block)
    rank = torch.cumsum(rows.int(), 1) - 1  # rank of each kept element in its row
    d = torch.where(rows, torch.arange(block).expand_as(rows) - rank, torch.zeros_like(rank))
    levels = int(d.max()).bit_length() if d.numel() else 0
    stages = 2 * levels  # compaction + the mirrored expansion
    return stages * e * n + e * n + compact_nodes(stages, rows.shape[0]) * o + 2 * c * n


def best_block(mask: torch.Tensor, coeffs: dict[str, float], max_rows: int = 64) -> tuple[int, float]:
    """The row length (a power of two dividing n, or n) that minimises :func:`compact_cost`.

    At most ``max_rows`` rows: every row adds three ``Slice`` nodes to the graph.
    """
    n = mask.numel()
    cands = {n} | {1 << i for i in range(3, 20) if (1 << i) < n and n % (1 << i) == 0 and n // (1 << i) <= max_rows}
    return min(((b, compact_cost(mask, b, coeffs)) for b in sorted(cands)), key=lambda t: t[1])


# ---------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------

def _pixel_or_channel(mod: nn.Module) -> tuple[torch.Tensor, tuple[int, ...], bool] | None:
    """(1-D keep mask, act_shape, by_channel) of a partial SparseReLU / hard gate; None otherwise."""
    if isinstance(mod, (RunsReLU, CompactReLU, PrefixReLU)):
        return None  # already lowered
    return keep_mask(mod)


def _perm_plan(gm: fx.GraphModule, node: fx.Node, calls: Counter) -> tuple[fx.Node, list[fx.Node]] | None:
    """Producer conv and consumer convs if the channel permutation can be folded into them."""
    src = node.args[0] if node.args else None
    prod = module_of(gm, src) if isinstance(src, fx.Node) else None
    if not isinstance(prod, nn.Conv2d) or prod.groups != 1 or len(src.users) != 1 or calls[src.target] != 1:
        return None
    consumers = list(node.users)
    if not consumers:
        return None
    for u in consumers:
        cm = module_of(gm, u)
        if not isinstance(cm, nn.Conv2d) or cm.groups != 1 or calls[u.target] != 1 or u.args[0] is not node \
                or len(u.args) != 1 or u.kwargs:
            return None
    return src, consumers


def pixel_channel_order(mask: torch.Tensor, act_shape: Sequence[int]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Channel order for ``pixel_perm``: by kept count, descending (stable); None if it changes nothing."""
    per = mask.reshape(act_shape[0], -1)
    counts = per.sum(1)
    order = torch.sort(-counts, stable=True).indices
    if torch.equal(order, torch.arange(order.numel())):
        return None, mask
    return order, per[order].reshape(-1).clone()


def _fold_permutation(gm: fx.GraphModule, plan: tuple[fx.Node, list[fx.Node]], order: torch.Tensor) -> None:
    """Reorder the producer conv's output channels and the consumer convs' input channels by ``order``."""
    src, consumers = plan
    prod = module_of(gm, src)
    with torch.no_grad():
        prod.weight.copy_(prod.weight[order])
        if prod.bias is not None:
            prod.bias.copy_(prod.bias[order])
        for u in consumers:
            cm = module_of(gm, u)
            cm.weight.copy_(cm.weight[:, order])
    meta(src)["channel_permutation"] = order.tolist()


def _set_module(gm: fx.GraphModule, target: str, mod: nn.Module) -> None:
    parent, _, attr = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, mod)


class PILoweringPass(Pass):
    """Re-lower every partial ReLU layer to its cheapest PI-ready form (see the module docstring)."""

    def __init__(self, forms: Sequence[str] = FORMS, coeffs: dict[str, float] | None = None):
        bad = [f for f in forms if f not in FORMS]
        if bad or not forms:
            raise ValueError(f"unknown PI forms {bad}; choose from {FORMS}")
        self.forms = tuple(forms)
        self.coeffs = coeffs

    def call(self, gm: fx.GraphModule) -> PassResult:
        coeffs = self.coeffs or lowering_coefficients()
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        chosen: list[dict[str, Any]] = []
        replaced = 0
        for node in list(gm.graph.nodes):
            mod = module_of(gm, node)
            info = _pixel_or_channel(mod) if mod is not None else None
            if info is None or calls[node.target] != 1:
                continue
            mask, act_shape, by_channel = info
            k = int(mask.sum())
            if k == 0 or k == mask.numel():
                continue  # LowerGatesPass handles all-linear / all-ReLU layers
            want_perm = "channel_perm" in self.forms if by_channel else "pixel_perm" in self.forms
            plan = _perm_plan(gm, node, calls) if want_perm else None
            costs = form_costs(mask, act_shape, by_channel, coeffs, perm_ok=plan is not None)
            costs = {f: v for f, v in costs.items() if f in self.forms}
            order = None
            if plan is not None and not by_channel and len(act_shape) > 1:
                order, pmask = pixel_channel_order(mask, act_shape)
                if order is not None:
                    pcosts = form_costs(pmask, act_shape, False, coeffs)
                    costs.update({f"perm+{f}": v for f, v in pcosts.items() if f in self.forms})
            if not costs:
                continue
            form = min(costs, key=costs.get)
            if form.startswith("perm+"):
                _fold_permutation(gm, plan, order)
                mask = pmask
                form = form[len("perm+"):]
                record_form = f"perm+{form}"
            else:
                record_form = form
            keep = torch.nonzero(mask).flatten()
            if form == "gather":
                new = SparseReLU(keep, act_shape, by_channel)
            elif form == "runs":
                new = RunsReLU(keep, act_shape, by_channel)
            elif form == "compact":
                new = CompactReLU(keep, act_shape, block=best_block(mask, coeffs)[0])
            else:
                new = PrefixReLU(k, act_shape)
                _fold_permutation(gm, plan, torch.cat([keep, torch.nonzero(~mask).flatten()]))
            form = record_form
            record = {"site": meta(node).get("site", node.name), "form": form, "kept": k, "n": int(mask.numel()),
                      "by_channel": by_channel, "costs_s": costs}
            chosen.append(record)
            if type(mod) is SparseReLU and form == "gather":
                continue  # already in this form
            replaced += 1
            _set_module(gm, node.target, new)
            meta(node)["kind"] = "sparse_relu"
            meta(node)["pi_form"] = form
            meta(node)["pi_costs_s"] = costs
        modified = replaced > 0
        stats = {"layers": chosen, "forms": dict(Counter(c["form"] for c in chosen)),
                 "data_movement_s": sum(c["costs_s"][c["form"]] for c in chosen)}
        return PassResult(gm, modified, stats)

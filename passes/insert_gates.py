"""InsertGatesPass: replace every canonical ReLU by a learnable :class:`ReLUGate`.

Gates start open (``alpha = 1``), so the pass preserves semantics exactly.
Granularity ``pixel`` gives one gate per activation element (C×H×W, as SNL),
``channel`` one per channel, ``layer`` one per ReLU site.  ``replacement``
``"affine"`` gives each gate a learnable per-channel linear replacement
``s·x + b`` for its linearized elements (init identity); ``"identity"`` (SNL)
keeps it fixed at ``x``.  Gates live under
the ``relucomp_gates`` container submodule, named after their ReLU site.
Requires :class:`ShapeAnalysisPass` metadata (``meta["relucomp"]["shape"]``).
"""

from __future__ import annotations

from torch import fx, nn

from relucomp.infra import Pass, PassResult
from relucomp.ir import is_canonical_relu, meta, unique_attr_name
from relucomp.nn import GRANULARITIES, REPLACEMENTS, ReLUGate

GATES = "relucomp_gates"


def gate_container(gm: fx.GraphModule) -> nn.Module:
    if not hasattr(gm, GATES):
        gm.add_submodule(GATES, nn.Module())
    return getattr(gm, GATES)


def gates_of(gm: nn.Module) -> dict[str, ReLUGate]:
    """Site name → gate, in graph order when ``gm`` is a GraphModule."""
    if isinstance(gm, fx.GraphModule):
        out = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                mod = gm.get_submodule(n.target)
                if isinstance(mod, ReLUGate):
                    out[mod.site or n.target] = mod
        return out
    return {m.site or name: m for name, m in gm.named_modules() if isinstance(m, ReLUGate)}


class InsertGatesPass(Pass):
    def __init__(self, granularity: str = "pixel", sites: set[str] | None = None, replacement: str = "identity"):
        from relucomp.errors import RelucompError

        if granularity not in GRANULARITIES:
            raise RelucompError(f"unknown granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")
        if replacement not in REPLACEMENTS:
            raise RelucompError(f"unknown replacement {replacement!r}", f"use one of {', '.join(REPLACEMENTS)}")
        self.granularity = granularity
        self.sites = sites
        self.replacement = replacement

    def requires(self, gm: fx.GraphModule) -> None:
        for n in gm.graph.nodes:
            if is_canonical_relu(n) and "shape" not in meta(n):
                raise RuntimeError("InsertGatesPass needs ShapeAnalysisPass metadata; run it first")

    def call(self, gm: fx.GraphModule) -> PassResult:
        container = None
        inserted = 0
        for node in list(gm.graph.nodes):
            if not is_canonical_relu(node):
                continue
            site = meta(node).get("site", node.name)
            if self.sites is not None and site not in self.sites:
                continue
            container = container or gate_container(gm)
            gate = ReLUGate(meta(node)["shape"], self.granularity, site=site, replacement=self.replacement)
            name = unique_attr_name(container, site)
            container.add_module(name, gate)
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(f"{GATES}.{name}", (node.args[0],))
            new.meta.update(node.meta)
            meta(new)["kind"] = "gate"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            inserted += 1
        return PassResult(gm, inserted > 0, {"gates": inserted, "granularity": self.granularity,
                                              "replacement": self.replacement})

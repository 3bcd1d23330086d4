"""DeadCodeEliminationPass: drop unused nodes and the submodules nobody calls."""

from __future__ import annotations

from torch import fx

from relucomp.infra import Pass, PassResult


class DeadCodeEliminationPass(Pass):
    def call(self, gm: fx.GraphModule) -> PassResult:
        n_nodes = len(gm.graph.nodes)
        n_mods = sum(1 for _ in gm.named_modules())
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        removed_nodes = n_nodes - len(gm.graph.nodes)
        removed_mods = n_mods - sum(1 for _ in gm.named_modules())
        return PassResult(gm, bool(removed_nodes or removed_mods),
                          {"removed_nodes": removed_nodes, "removed_modules": removed_mods})

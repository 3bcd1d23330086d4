"""Stage ``model``: resolve the model, check it on the data, trace it, and check the budgets (before training)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..budget import check_relu_budget, check_uncounted_nonlinearities, parse_count
from ..errors import RelucompError
from ..passes.shape_prop import layer_table
from ..pipelines import analyze, check_io, resolve_leaf_modules, resolve_model, summary
from .base import RunState

NAME = "model"


@dataclass
class ModelOut:
    model: nn.Module        # the user's model (a copy), weights as given
    spec: str | None        # None for an nn.Module object
    trained: bool           # weights given (checkpoint, object, --pretrained): no pretraining by default
    dense_gm: fx.GraphModule
    before_rows: list[dict[str, Any]]
    before: dict[str, Any]
    budget: int             # the user's budget: final checks, export, metadata
    gate_budget: int        # what the gates get: budget less the comparisons no gate controls
    leaf_modules: tuple
    adv_teacher_from: nn.Module | None = None   # robustness.adv_teacher_from, loaded and checked before training


def run(st: RunState) -> ModelOut:
    cfg, data = st.cfg, st["data"]
    spec_in = st.hooks.model if st.hooks.model is not None else cfg.model.spec
    model, spec, trained = resolve_model(spec_in, num_classes=data.num_classes, checkpoint=cfg.model.checkpoint,
                                         pretrained=cfg.model.pretrained)
    check_io(model, data.calib, data.num_classes)
    leaves = tuple(st.hooks.leaf_modules) + resolve_leaf_modules(cfg.model.leaf_modules, model)
    dense = analyze(model, data.calib, leaf_modules=leaves)  # structure only: bad budgets fail before training
    before = summary(dense)
    if before["relus"] == 0:
        raise RelucompError("the model has no ReLUs that relucomp can see",
                            "relucomp gates ReLUs; models using other activations are not supported yet")
    budget = check_relu_budget(parse_count(cfg.search.relu_budget, total=before["relus"]), before["relus"])
    # comparisons no gate controls (ReLUs hidden in leaf modules, ReLU6, clamp, other activations [, MaxPool])
    # are charged against the budget before any training; the gates get what is left
    gate_budget = check_uncounted_nonlinearities(dense, budget, include_maxpool=cfg.search.budget_includes_maxpool)
    p = cfg.pruning
    if p.prune_channels is not None or p.mac_budget is not None or p.sparsity is not None:
        from ..pruning import check_options

        check_options(dense, prune_channels=p.prune_channels, mac_budget=p.mac_budget, sparsity=p.sparsity,
                      importance=p.importance)
    if cfg.dp.epsilon is not None:  # δ < 1/n needs the training split's size: checked here, before any training
        from ..config import check_dp

        check_dp(cfg, len(data.bundle.train))
    distill = None
    if cfg.robustness.robust:               # a layer-wise student_init names the student's layers
        from ..config import check_student_init_layers

        check_student_init_layers(cfg, list(dense.state_dict()))
        rb = cfg.robustness
        if rb.adv_teacher_from is not None:  # the robust model the second teacher is distilled from
            try:
                distill = resolve_model(rb.adv_teacher_from, num_classes=data.num_classes,
                                        checkpoint=rb.adv_teacher_from_checkpoint)[0].eval()
                check_io(distill, data.calib, data.num_classes)
            except RelucompError as exc:     # say which model: not the one being compiled
                raise type(exc)(f"robustness.adv_teacher_from: {exc.cause}", exc.fix) from exc
    st.say(f"model: {before['relus']:,} ReLUs, {before['macs']:,} MACs; budget {budget:,}"
           + (f" ({gate_budget:,} for the gates)" if gate_budget != budget else ""))
    return ModelOut(model=model, spec=spec, trained=trained, dense_gm=dense, before_rows=layer_table(dense),
                    before=before, budget=budget, gate_budget=gate_budget, leaf_modules=leaves,
                    adv_teacher_from=distill)

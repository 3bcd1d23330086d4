"""The pass pipelines the stages run (the driver imports passes; passes never import this).

* :func:`analyze` — trace → canonicalize ReLUs → DCE → shape/ReLU/MAC analysis.
* :func:`build_gated` — the same plus open learnable gates.
* :func:`lowering_passes` — lower gates → fold BN → (PI layout) → compose affine → DCE → analysis.
* :func:`summary` — totals of a layer table.
* :func:`resolve_model` / :func:`check_io` — a model spec or object as an ``nn.Module``, checked on the data.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import fx, nn

from .errors import ModelLoadError, RelucompError
from .infra import PassManager
from .ir import trace
from .passes.canonicalize import CanonicalizeReLUPass
from .passes.compose_affine import ComposeAffinePass
from .passes.dce import DeadCodeEliminationPass
from .passes.fold_bn import FoldBatchNormPass
from .passes.insert_gates import InsertGatesPass
from .passes.lower_gates import LowerGatesPass
from .passes.shape_prop import ShapeAnalysisPass, layer_table


def analyze(model: nn.Module | fx.GraphModule, example: torch.Tensor, *, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace + canonicalize + shape analysis (verified); returns the annotated GraphModule."""
    gm = trace(model, leaf_modules=leaf_modules)
    pm = PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1])],
                     calibration=example)
    return pm.run(gm).gm


def summary(gm: fx.GraphModule) -> dict[str, Any]:
    """Totals per image: ReLUs (all, kept; ``hidden_relus`` inside opaque leaf modules), MACs, MaxPool
    comparisons, ``comparisons`` no gate controls and ``nonlinearities`` ({op kind: comparisons})."""
    rows = layer_table(gm)
    ops: dict[str, int] = {}
    for r in rows:
        for k, v in r.get("nonlinearities", {}).items():
            ops[k] = ops.get(k, 0) + v
    return {"relus": sum(r["relus"] for r in rows), "relus_kept": sum(r["relus_kept"] for r in rows),
            "macs": sum(r["macs"] for r in rows),
            "maxpool_comparisons": sum(r.get("maxpool_comparisons", 0) for r in rows),
            "hidden_relus": sum(r.get("hidden_relus", 0) for r in rows),
            "comparisons": sum(r.get("comparisons", 0) for r in rows), "nonlinearities": ops,
            "params": int(sum(p.numel() for p in gm.parameters()))}


def build_gated(model: nn.Module, example: torch.Tensor, *, granularity: str,
                leaf_modules: Sequence[type] = ()) -> tuple[fx.GraphModule, PassManager]:
    """Trace, canonicalize and insert open gates (each step verified)."""
    gm = trace(model, leaf_modules=leaf_modules)
    pm = PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1]),
                      InsertGatesPass(granularity)], calibration=example)
    return pm.run(gm).gm, pm


def lowering_passes(example: torch.Tensor, *, gate_form: str = "sparse", compose: str = "macs") -> list:
    """The lowering pipeline; ``gate_form`` "pi" / "edge" are the two export targets (see export_targets)."""
    if gate_form in ("pi", "edge"):
        if gate_form == "pi":  # PI-ready: per layer, the cheapest data-movement form around the kept ReLUs
            from .passes.pi_lowering import PILoweringPass as FormPass
        else:  # plaintext-optimal: each partial layer one Max(x, x*s) (passes/edge_lowering.py)
            from .passes.edge_lowering import EdgeLoweringPass as FormPass
        return [LowerGatesPass("sparse"), FoldBatchNormPass(), FormPass(), ComposeAffinePass(compose),
                DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1])]
    return [LowerGatesPass(gate_form), FoldBatchNormPass(), ComposeAffinePass(compose), DeadCodeEliminationPass(),
            ShapeAnalysisPass(example[:1])]


def resolve_model(model: Any, *, num_classes: int, checkpoint=None, pretrained: bool = False) -> tuple[nn.Module, str | None, bool]:
    """Return (module, spec or None, has_trained_weights).

    A built-in name or a ``file.py:factory`` model is untrained unless a
    checkpoint is given or the user vouches for the factory's weights
    (``pretrained=True``, ``--pretrained``); an ``nn.Module`` object is taken as trained.
    """
    from .models import load_checkpoint, load_model
    from .config import DEFAULT_ARCH

    if model is None:
        return load_model(DEFAULT_ARCH, num_classes=num_classes), DEFAULT_ARCH, False
    if isinstance(model, str):
        m = load_model(model, num_classes=num_classes, checkpoint=checkpoint)
        return m, model, checkpoint is not None or pretrained
    if isinstance(model, nn.Module):
        m = copy.deepcopy(model)
        if checkpoint is not None:
            load_checkpoint(m, checkpoint)
        return m, None, True
    raise RelucompError(f"unsupported model object {type(model).__name__}",
                        "pass an nn.Module, a built-in name like 'resnet18', or 'file.py:factory'")


def resolve_leaf_modules(names: Sequence[str], model: nn.Module) -> tuple[type, ...]:
    """``--leaf-module`` values as classes: ``ClassName`` or ``module:ClassName`` of a submodule of ``model``."""
    out = []
    classes = {type(m) for m in model.modules()}
    for name in names:
        where, _, cls_name = name.rpartition(":")
        found = [c for c in classes if c.__name__ == cls_name
                 and (not where or c.__module__ == where or where.endswith(".py"))]
        if not found:
            raise ModelLoadError(f"--leaf-module {name!r}: the model has no submodule of class {cls_name!r}",
                                 "give the class that wraps the untraceable code, e.g. --leaf-module MyBlock "
                                 f"(classes in the model: {', '.join(sorted({c.__name__ for c in classes})[:8])})")
        out.extend(found)
    return tuple(out)


def check_io(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as exc:  # noqa: BLE001
        raise RelucompError(
            f"the model does not accept inputs of shape {tuple(x[:2].shape)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            "use a model for 3-channel images of this size, or set --image-size to what the model expects",
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise RelucompError(f"the model must return logits of shape (N, classes); it returned "
                            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}",
                            "wrap the model so that forward returns a single logits tensor")
    if out.shape[1] != num_classes:
        raise RelucompError(f"the model outputs {out.shape[1]} classes but the data has {num_classes}",
                            "build the model with the data's number of classes (factories get num_classes=...)")

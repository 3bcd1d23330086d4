"""Stage ``export`` (with an output directory): model.pt and the verified ONNX export(s) (atomic writes).

``export.target`` (:mod:`relucomp.export_targets`): ``pi`` writes the compiled
(PI-lowered) graph to ``model.onnx``; ``edge`` re-lowers the gated weights just
saved in ``model.pt`` for plaintext runtimes into ``model.edge.onnx``; ``both``.
All hold the weights of ``export.weights`` (``ema`` by default under DP: the
averaged weights; else ``last``); under DP the ONNX metadata carries ε spent,
δ, the noise multiplier, the clipping norm and the sampling rate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from ..evaluate import predict
from ..loaders import first_batch
from ..train import Checkpointer
from .base import RunState
from .finetune import tuned

NAME = "export"
MODEL_FORMAT = "relucomp-compiled-v1"


@dataclass
class ExportOut:
    onnx_path: Path | None


def when(st: RunState) -> bool:
    from ..distributed import is_main

    return st.out is not None and is_main()  # multi-process: rank 0 writes


def save_compiled(path: Path, gated_state: dict, **info) -> None:
    Checkpointer(path).save({"format": MODEL_FORMAT, "state_dict": gated_state, "info": dict(info)})


def run(st: RunState) -> ExportOut:
    from ..export_targets import FILENAMES, export_compiled, export_model, parse_target

    cfg, out, data, m, rep = st.cfg, st.out, st["data"], st["model"], st["report"]
    low, prune, ft = st["fold"], st.results.get("prune"), tuned(st)
    weights = ft.weights  # ema only when an EMA exists
    save_compiled(out / "model.pt", ft.gated_state, spec=m.spec, num_classes=data.num_classes,
                  granularity=cfg.search.granularity, image_size=cfg.data.image_size, gate_form=cfg.export.gate_form,
                  budget=m.budget, pruning_plan=prune.plan if prune is not None else None,
                  replace_maxpool=cfg.search.replace_maxpool, weights=weights, dp_compat=ft.dp is not None,
                  budget_includes_maxpool=cfg.search.budget_includes_maxpool, replacement=cfg.search.replacement)
    if not cfg.export.enabled:
        return ExportOut(onnx_path=None)
    b, targets = data.bundle, parse_target(cfg.export.target)
    acc = rep.test_accuracy[1] if weights == "last" else predict(low.ema, data.test).acc
    meta = {"relu_count": low.after["relus_kept"], "relu_budget": m.budget, "architecture": rep.model,
            "granularity": cfg.search.granularity, "dataset": b.name, "num_classes": data.num_classes,
            "input_shape": [3, cfg.data.image_size, cfg.data.image_size], "group_attribute": b.group_attribute,
            "accuracy_test": round(acc, 3), "fair_groups": b.group_names, "fair_method": cfg.fair_method,
            "tolerance_eps": cfg.fairness.tolerance, "test_max_psi": rep.fairness_test(weights).get("max_psi"),
            "export_weights": weights}
    if ft.dp is not None:
        from ..dp import metadata

        meta.update(metadata(ft.dp.to_dict(), weights))
    verify, exports = first_batch(data.test, 7), {}
    if "pi" in targets:
        exports["pi"] = rep.export = export_model(
            low.ema if weights == "ema" else low.gm, out / FILENAMES["pi"], "pi", example=data.calib[:1],
            verify_batch=verify, metadata=meta, budget=m.budget, opset=cfg.export.opset,
            include_maxpool=cfg.search.budget_includes_maxpool)
    if "edge" in targets:  # re-lowered for plaintext from the gated (exported) weights just saved (model.pt)
        model = copy.deepcopy(m.model) if m.spec is None else None  # the architecture; weights from model.pt
        exports["edge"] = export_compiled(out, "edge", verify_batch=verify, metadata=meta, model=model,
                                          opset=cfg.export.opset)["edge"]
    rep.exports = exports
    return ExportOut(onnx_path=out / FILENAMES[targets[0]])

"""Stage ``export`` (with an output directory): model.pt and the verified model.onnx (atomic writes).

Both hold the weights of ``export.weights`` (``ema`` by default under DP: the
averaged weights; else ``last``); under DP the ONNX metadata carries ε spent,
δ, the noise multiplier, the clipping norm and the sampling rate.
"""

from __future__ import annotations

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
    return st.out is not None


def save_compiled(path: Path, gated_state: dict, **info) -> None:
    Checkpointer(path).save({"format": MODEL_FORMAT, "state_dict": gated_state, "info": dict(info)})


def run(st: RunState) -> ExportOut:
    from ..export import export_onnx

    cfg, out, data, m, rep = st.cfg, st.out, st["data"], st["model"], st["report"]
    low, prune, ft = st["fold"], st.results.get("prune"), tuned(st)
    weights = ft.weights  # ema only when an EMA exists
    save_compiled(out / "model.pt", ft.gated_state, spec=m.spec, num_classes=data.num_classes,
                  granularity=cfg.search.granularity, image_size=cfg.data.image_size, gate_form=cfg.export.gate_form,
                  budget=m.budget, pruning_plan=prune.plan if prune is not None else None,
                  replace_maxpool=cfg.search.replace_maxpool, weights=weights, dp_compat=ft.dp is not None)
    onnx_path = None
    if cfg.export.enabled:
        b = data.bundle
        gm = low.ema if weights == "ema" else low.gm
        acc = rep.test_accuracy[1] if weights == "last" else predict(gm, data.test).acc
        meta = {"relu_count": low.after["relus_kept"], "relu_budget": m.budget, "architecture": rep.model,
                "granularity": cfg.search.granularity, "dataset": b.name, "num_classes": data.num_classes,
                "input_shape": [3, cfg.data.image_size, cfg.data.image_size], "group_attribute": b.group_attribute,
                "accuracy_test": round(acc, 3), "fair_groups": b.group_names, "fair_method": cfg.fair_method,
                "tolerance_eps": cfg.fairness.tolerance, "test_max_psi": rep.fairness_test(weights).get("max_psi"),
                "export_weights": weights}
        if ft.dp is not None:
            from ..dp import metadata

            meta.update(metadata(ft.dp.to_dict(), weights))
        rep.export = export_onnx(gm, out / "model.onnx", example=data.calib[:1],
                                 verify_batch=first_batch(data.test, 7), metadata=meta, max_relus=m.budget,
                                 opset=cfg.export.opset, include_maxpool=cfg.search.budget_includes_maxpool)
        rep.export["weights"] = weights
        onnx_path = out / "model.onnx"
    return ExportOut(onnx_path=onnx_path)

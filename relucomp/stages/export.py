"""Stage ``export`` (with an output directory): model.pt and the verified model.onnx (atomic writes)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..loaders import first_batch
from ..train import Checkpointer
from .base import RunState

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
    low, prune = st["fold"], st.results.get("prune")
    save_compiled(out / "model.pt", st["finetune"].gated_state, spec=m.spec, num_classes=data.num_classes,
                  granularity=cfg.search.granularity, image_size=cfg.data.image_size, gate_form=cfg.export.gate_form,
                  budget=m.budget, pruning_plan=prune.plan if prune is not None else None,
                  replace_maxpool=cfg.search.replace_maxpool, replacement=cfg.search.replacement)
    onnx_path = None
    if cfg.export.enabled:
        b = data.bundle
        meta = {"relu_count": low.after["relus_kept"], "relu_budget": m.budget, "architecture": rep.model,
                "granularity": cfg.search.granularity, "dataset": b.name, "num_classes": data.num_classes,
                "input_shape": [3, cfg.data.image_size, cfg.data.image_size], "group_attribute": b.group_attribute,
                "accuracy_test": round(rep.test_accuracy[1], 3), "fair_groups": b.group_names,
                "fair_method": cfg.fair_method, "tolerance_eps": cfg.fairness.tolerance, "test_max_psi": rep.max_psi}
        rep.export = export_onnx(low.gm, out / "model.onnx", example=data.calib[:1],
                                 verify_batch=first_batch(data.test, 7), metadata=meta, max_relus=m.budget,
                                 opset=cfg.export.opset, include_maxpool=cfg.search.budget_includes_maxpool)
        onnx_path = out / "model.onnx"
    return ExportOut(onnx_path=onnx_path)

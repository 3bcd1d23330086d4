"""Stage ``report``: assemble the typed :class:`~relucomp.compile_report.CompileReport` from the stage outputs."""

from __future__ import annotations

from .. import __version__
from ..compile_report import CompileReport
from .base import RunState
from .finetune import tuned as finetuned
from .prune import PruneOut

NAME = "report"


def run(st: RunState) -> CompileReport:
    cfg, data, m = st.cfg, st["data"], st["model"]
    bundle, low, dense, comp = data.bundle, st["fold"], st["evaluate_dense"], st["evaluate_compiled"]
    search, tuned = st["search"], finetuned(st)
    kept = {r["name"]: r["relus_kept"] for r in low.rows if r["kind"] in ("relu", "gate", "sparse_relu")}
    per_layer = [{"site": r["name"], "shape": r["shape"], "relus_before": r["relus"], "relus_after": int(kept.get(r["name"], 0))}
                 for r in m.before_rows if r["kind"] == "relu"]
    before, after = m.before, low.after
    diag, fair = st.results.get("diagnose"), st.results.get("fairness")
    return CompileReport(
        relucomp_version=__version__, model=m.spec or type(m.model).__name__,
        data={"name": bundle.name, "spec": bundle.spec or (cfg.data.spec if st.hooks.data is None else None),
              "target": bundle.target, "group_attribute": bundle.group_attribute, "num_classes": data.num_classes,
              "summary": bundle.summary()},
        options={"relu_budget": m.budget, "granularity": cfg.search.granularity, "search": cfg.search.method,
                 "search_epochs": cfg.search.epochs, "finetune_epochs": cfg.finetune.epochs,
                 "pretrain_epochs": st["pretrain"].epochs, "batch_size": cfg.runtime.batch_size, "lr": cfg.search.lr,
                 "seed": cfg.runtime.seed, "gate_form": cfg.export.gate_form,
                 "export_target": cfg.export.target, "replace_maxpool": cfg.search.replace_maxpool,
                 "export_weights": tuned.weights, "effort": cfg.runtime.effort, "replacement": cfg.search.replacement,
                 "warmup": cfg.search.warmup, "hysteresis": cfg.search.hysteresis, "refine": cfg.search.refine,
                 "ft_kd_weight": cfg.finetune.kd_weight, "ft_temperature": cfg.finetune.temperature,
                 "bn_recalibrate": cfg.finetune.bn_recalibrate},
        config=cfg.to_dict(), pretrain=st["pretrain"].info,
        relus={"before": before["relus"], "after": after["relus_kept"], "budget": m.budget,
               "gate_budget": m.gate_budget, "hidden_before": before["hidden_relus"],
               "hidden_after": after["hidden_relus"]},
        comparisons={"ungated_before": before["comparisons"], "ungated_after": after["comparisons"],
                     "budget_includes_maxpool": cfg.search.budget_includes_maxpool,
                     "nonlinearities": before["nonlinearities"]},
        macs={"before": before["macs"], "after": after["macs"]},
        params={"before": before["params"], "after": after["params"]},
        maxpool_comparisons={"before": before["maxpool_comparisons"], "after": after["maxpool_comparisons"]},
        per_layer=per_layer,
        accuracy={"before": {"val": dense.val.acc, "test": dense.test.acc},
                  "after": {"val": comp.val.acc, "test": comp.test.acc}},
        group_accuracy={"groups": bundle.group_names, "before": dense.test_group_acc, "after": comp.test_group_acc,
                        "test_counts": bundle.test.group_counts()},
        fairness=fair.section if fair is not None else None, diagnostics=diag.section if diag is not None else None,
        search=search.light, search_history=search.stats.get("history", []),
        lambda_trace=search.stats.get("lambda_trace", []), finetune_history=tuned.stats.get("history", []),
        passes=low.records, pruning=(st.results.get("prune") or PruneOut()).report, phases_seconds=st.phases, dp=tuned.dp,
        robustness=st["robustness"].to_dict() if "robustness" in st.results else None)

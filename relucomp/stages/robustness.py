"""Stage ``robustness`` (with ``robustness.eval`` / ``--eval-robustness``): CA, NPA and AdvA of the dense and
the compiled model, overall and per group (:mod:`relucomp.robustness`); the report's ``robustness`` section."""

from __future__ import annotations

from ..config import robustness_settings
from ..robustness import RobustnessResult, evaluate_robustness
from .base import RunState

NAME = "robustness"


def when(st: RunState) -> bool:
    return st.cfg.robustness.eval or st.cfg.robustness.robust   # the robust compile always reports robustness


def run(st: RunState) -> RobustnessResult:
    settings = robustness_settings(st.cfg)
    # under --robust "dense" is the robust teacher (robust_compile.teacher says how it was made)
    models = {"dense": st["pretrain"].teacher, "compiled": st["fold"].gm}
    dual = st.results.get("dual_bn_export")
    if dual is not None and dual.other is not None:  # robustness.compare_branches: the branch not exported, folded
        from ..infra import PassManager
        from ..pipelines import lowering_passes

        calib = st["data"].calib
        alt = PassManager(lowering_passes(calib, gate_form=st.cfg.export.gate_form), calibration=calib).run(dual.other)
        models["compiled_" + ("perturbed" if dual.branch == "clean" else "clean") + "_bn"] = alt.gm
    res = evaluate_models(models, st["data"].bundle, settings, split=st.cfg.robustness.split, progress=st.progress,
                          say=st.say)
    if "robust_teacher" in st.results:
        rt = st["robust_teacher"]
        res.robust_compile = {"teacher": {k: v for k, v in rt.info.items() if k != "history"},
                              "teacher_history": rt.info.get("history", []),
                              "dual_bn_layers": dual.layers if dual is not None else 0,
                              "exported_branch": dual.branch if dual is not None else None,
                              "dense_is": "the robust teacher"}
    return res


def evaluate_models(models, bundle, settings, *, split: str = "test", progress=None, say=None) -> RobustnessResult:
    """:func:`~relucomp.robustness.evaluate_robustness` on ``bundle``'s ``split`` (test | val, recorded in the
    result's settings) with a rich progress bar (``progress``: a rich Progress)."""
    dataset = getattr(bundle, split)
    n = len(dataset) if settings.samples is None else min(settings.samples, len(dataset))
    if say is not None:
        say(f"robustness: {n} {split} images, {len(settings.corruptions)} corruptions × {len(settings.severities)} "
            f"severities, PGD {settings.pgd_steps} steps")
    task = progress.add_task("robustness", total=len(settings.corruptions) * len(settings.severities) + 2,
                             info="") if progress is not None else None

    def tick(what: str, done: int, total: int) -> None:
        if task is not None:
            progress.update(task, completed=done, info=what)

    res = evaluate_robustness(models, dataset, settings, progress=tick)
    res.settings["split"] = split
    return res

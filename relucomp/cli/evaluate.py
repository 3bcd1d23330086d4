"""``relucomp evaluate OUT``: robustness (CA / NPA / AdvA) of an existing compiled model, added to OUT/report.json."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import (Corruptions, NoProgress, PgdEpsilon, PgdStep, PgdSteps, RobustnessSamples, RobustnessSplit, Severities, app,
                  errors_handled, given, log, out_console, quiet_torch_logs, robustness_table)


@app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    out: Path = typer.Argument(..., help="the --out directory of a finished relucomp compile"),
    eval_robustness: bool = typer.Option(True, "--eval-robustness/--no-eval-robustness",
                                         help="compute the robustness section (the only evaluation so far)"),
    corruptions: Corruptions = None,
    severities: Severities = None,
    robustness_samples: RobustnessSamples = None,
    robustness_split: RobustnessSplit = None,
    pgd_epsilon: PgdEpsilon = None,
    pgd_step: PgdStep = None,
    pgd_steps: PgdSteps = None,
    no_dense: bool = typer.Option(False, "--no-dense", help="evaluate the compiled model only (no dense model "
                                                            "rebuilt from the pretraining cache)"),
    no_progress: NoProgress = False,
) -> None:
    """Rebuild OUT's compiled and dense models and data, add CA / NPA / AdvA to OUT/report.json."""
    from ..reevaluate import evaluate_compiled

    overrides = given(ctx, skip=("out", "eval_robustness", "no_dense", "no_progress"))
    if not eval_robustness:
        out_console.print("nothing to evaluate (--no-eval-robustness)")
        return
    quiet_torch_logs()
    with errors_handled():
        rep = evaluate_compiled(out, dense=not no_dense, progress=not no_progress, log=log, **overrides)
    out_console.print(robustness_table(rep.robustness_result))
    out_console.print(f"report: {out / 'report.json'}")

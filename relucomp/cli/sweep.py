"""``relucomp sweep`` and ``relucomp report``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import ConfigError
from .app import (OVERRIDES, OVERRIDES_HELP, BatchSize, BudgetIncludesMaxpool, Checkpoint, ConfigFile, DPAugmult,
                  DPBatchSize, DPDelta, DPEpsilon, DPMaxGradNorm, DPPhase, Device, Effort, ExportTarget, ExportWeights,
                  FinetuneEpochs, ImageSize, Limit, Lr, NoProgress, PretrainEpochs, Replacement, SearchEpochs, Seed,
                  Target, app, config_overrides, errors_handled, given, help_panels, log, merge_overrides, out_console,
                  quiet_torch_logs)


# the sweep's own fairness options (several methods compared; one search shared when the constraints act in the finetune)
FAIR_METHODS = typer.Option(None, "--fair-method", help="comma-separated finetuning methods to compare, e.g. nft,ceag")
TOLERANCE = typer.Option(2.0, "--tolerance", help="CEAG: max excess accuracy gap ψ_g, in points")
FAIR_PHASE = typer.Option("finetune", "--fair-phase",
                          help="finetune (one shared search) | search | both (one search per method)")

GRANULARITY = typer.Option("pixel", "--granularity", help="pixel | channel | layer")
SEARCH = typer.Option("snl", "--search", help="snl (one shared search) | layer-drop")


#: config options a sweep sets itself, and where the user gives them instead
SWEEP_OWN = {"model.spec": "MODEL", "data.spec": "--data", "search.relu_budget": "--budgets", "runtime.out_dir": "--out"}


@app.command("sweep", context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
@help_panels
def sweep_cmd(
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="built-in name, file.py:factory or package.module:factory; "
                                                   "default: resnet8 trained on the data"),
    budgets: str = typer.Option(..., "--budgets", "-b", help="comma-separated ReLU budgets, e.g. 5k,10k,15k,30k,60k"),
    out: Path = typer.Option(Path("relucomp-sweep"), "--out", "-o", help="sweep directory (resumable)"),
    data: str = typer.Option("synthetic", "--data", help="synthetic | utkface:PATH | cifar10:PATH | ... (as in compile)"),
    target: Target = None,
    fair_groups: Optional[str] = typer.Option(None, "--fair-groups", help="group attribute(s), e.g. race"),
    fair_method: Optional[str] = FAIR_METHODS,
    tolerance: float = TOLERANCE,
    fair_phase: str = FAIR_PHASE,
    dp_epsilon: DPEpsilon = None,
    dp_delta: DPDelta = None,
    dp_max_grad_norm: DPMaxGradNorm = None,
    dp_phase: DPPhase = None,
    dp_batch_size: DPBatchSize = None,
    dp_augmult: DPAugmult = None,
    export_weights: ExportWeights = None,
    granularity: str = GRANULARITY,
    search: str = SEARCH,
    epochs: SearchEpochs = None,
    finetune_epochs: FinetuneEpochs = None,
    pretrain_epochs: PretrainEpochs = None,
    checkpoint: Checkpoint = None,
    batch_size: BatchSize = None,
    lr: Lr = 0.01,
    limit: Limit = None,
    image_size: ImageSize = 32,
    seed: Seed = 0,
    effort: Effort = None,
    replacement: Replacement = "affine",
    budget_includes_maxpool: BudgetIncludesMaxpool = False,
    no_export: bool = typer.Option(False, "--no-export", help="skip the ONNX export of each run"),
    export_target: ExportTarget = "pi",
    keep_snapshots: bool = typer.Option(False, "--keep-snapshots", help="keep the search snapshots after the sweep"),
    report: bool = typer.Option(True, "--report/--no-report", help="render OUT/report.html at the end"),
    no_progress: NoProgress = False,
    device: Device = "cpu",
    config: ConfigFile = None,
) -> None:
    """Compile MODEL at several ReLU budgets (one shared mask search) into OUT/runs/<budget>[-<method>]/.

    Interrupted? Run the same command again: finished budgets are skipped.
    """
    from ..sweep import sweep

    quiet_torch_logs()
    flags = given(ctx, skip=("model", "data", "budgets", "out_dir", "out", "fair_method", "no_export",
                             "keep_snapshots", "report", "config"))
    if no_export:
        flags["export"] = False
    methods = [m.strip() for m in fair_method.split(",") if m.strip()] if fair_method else None
    with errors_handled("run the same command again (finished budgets are skipped)"):
        model, dotted = config_overrides(ctx, model)
        for key, own in SWEEP_OWN.items():
            if key in dotted:
                raise ConfigError(f"--{key} does not apply to a sweep (it sets it per run)", f"give {own} instead")
        overrides = merge_overrides(flags, dotted)
        res = sweep(model, data, budgets=budgets, out_dir=out, fair_methods=methods, config=config,
                    keep_snapshots=keep_snapshots, log=log, **overrides)
    print_sweep(res)
    if report:
        from ..report import render_report

        with errors_handled():
            path = render_report(out)
        out_console.print(f"report: {path}")


def print_sweep(res) -> None:
    reps = res.reports()
    if not reps:
        return
    groups = reps[0].group_names
    t = Table(title=f"relucomp sweep ({res.out_dir})")
    for c in ["run", "ReLUs", "test acc"] + list(groups) + ["max ψ_g", ""]:
        t.add_column(c, justify="left" if c == "run" else "right")
    r0 = reps[0]
    pct = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    t.add_row("dense", f"{r0.relus_before:,}", f"{r0.test_accuracy[0]:.2f}%",
              *[pct(r0.group_accuracy["before"].get(g)) for g in groups], "", "")
    for run, rep in zip(res.runs, reps):
        mp = rep.max_psi
        t.add_row(run["name"], f"{rep.relus_after:,}", f"{rep.test_accuracy[1]:.2f}%",
                  *[pct(rep.group_accuracy["after"].get(g)) for g in groups],
                  "-" if mp is None else f"{mp:+.2f}", "skipped (done)" if run["name"] in res.skipped else "")
    out_console.print(t)


@app.command("report")
def report_cmd(
    directory: Path = typer.Argument(..., help="a relucomp sweep --out directory, or a relucomp compile --out directory"),
    budget: Optional[str] = typer.Option(None, "--budget", help="budget of the ψ_g bars (default: the smallest)"),
    inline: bool = typer.Option(False, "--inline", help="embed the figures as base64 (one self-contained file)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default DIRECTORY/report.html)"),
) -> None:
    """Render DIRECTORY/report.html: group accuracy vs budget, ψ_g bars, ReLUs per layer, PI latency, tables."""
    from ..report import render_report

    with errors_handled():
        path = render_report(directory, budget=budget, inline=inline, out=out)
    out_console.print(f"report: {path}")

"""``relucomp sweep`` and ``relucomp report`` (registered on the app in :mod:`relucomp.cli`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table


def sweep_cmd(
    model: Optional[str] = typer.Argument(None, help="built-in name, file.py:factory or package.module:factory; "
                                                   "default: resnet8 trained on the data"),
    budgets: str = typer.Option(..., "--budgets", "-b", help="comma-separated ReLU budgets, e.g. 5k,10k,15k,30k,60k"),
    out: Path = typer.Option(Path("relucomp-sweep"), "--out", "-o", help="sweep directory (resumable)"),
    data: str = typer.Option("synthetic", "--data", help="synthetic | utkface:PATH | cifar10:PATH | ... (as in compile)"),
    target: Optional[str] = typer.Option(None, "--target", help="label to predict (data-set specific)"),
    fair_groups: Optional[str] = typer.Option(None, "--fair-groups", help="group attribute(s), e.g. race"),
    fair_method: Optional[str] = typer.Option(None, "--fair-method",
                                              help="comma-separated finetuning methods to compare, e.g. nft,ceag"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="CEAG: max excess accuracy gap ψ_g, in points"),
    fair_phase: str = typer.Option("finetune", "--fair-phase",
                                   help="finetune (one shared search) | search | both (one search per method)"),
    granularity: str = typer.Option("pixel", "--granularity", help="pixel | channel | layer"),
    search: str = typer.Option("snl", "--search", help="snl (one shared search) | layer-drop"),
    epochs: int = typer.Option(4, "--epochs", help="mask-search epochs (one search for all budgets)"),
    finetune_epochs: int = typer.Option(4, "--finetune-epochs", help="finetune epochs per budget"),
    pretrain_epochs: Optional[int] = typer.Option(None, "--pretrain-epochs", help="train an untrained built-in model first (cached)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="state_dict for MODEL"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(0.01, "--lr"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use at most this many images (quick runs)"),
    image_size: int = typer.Option(32, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    no_export: bool = typer.Option(False, "--no-export", help="skip the ONNX export of each run"),
    keep_snapshots: bool = typer.Option(False, "--keep-snapshots", help="keep the search snapshots after the sweep"),
    report: bool = typer.Option(True, "--report/--no-report", help="render OUT/report.html at the end"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
) -> None:
    """Compile MODEL at several ReLU budgets (one shared mask search) into OUT/runs/<budget>[-<method>]/.

    Interrupted? Run the same command again: finished budgets are skipped.
    """
    from .cli import _fail, _quiet_torch_logs, console, out_console
    from .errors import RelucompError
    from .sweep import sweep
    from .train import Interrupted

    _quiet_torch_logs()
    methods = [m.strip() for m in fair_method.split(",") if m.strip()] if fair_method else None
    try:
        res = sweep(model, data, budgets=budgets, out_dir=out, fair_methods=methods, fair_groups=fair_groups,
                    target=target, tolerance=tolerance, fair_phase=fair_phase, search=search, granularity=granularity,
                    search_epochs=epochs, finetune_epochs=finetune_epochs, pretrain_epochs=pretrain_epochs,
                    checkpoint=checkpoint, batch_size=batch_size, lr=lr, limit=limit, image_size=image_size,
                    seed=seed, export=not no_export, keep_snapshots=keep_snapshots, progress=not no_progress,
                    device=device, log=lambda s: console.print(f"[dim]{s}[/]"))
    except Interrupted as exc:
        console.print(f"[yellow]{exc.cause}[/]\n  [bold]resume:[/] {exc.fix}")
        raise typer.Exit(130)
    except KeyboardInterrupt:
        console.print("[yellow]sweep interrupted[/]\n  [bold]resume:[/] run the same command again "
                      "(finished budgets are skipped)")
        raise typer.Exit(130)
    except RelucompError as exc:
        _fail(exc)
    _print_sweep(res)
    if report:
        from .report import render_report

        try:
            path = render_report(out)
        except RelucompError as exc:
            _fail(exc)
        out_console.print(f"report: {path}")


def _print_sweep(res) -> None:
    from .cli import out_console

    reps = res.reports()
    if not reps:
        return
    groups = reps[0]["group_accuracy"]["groups"]
    t = Table(title=f"relucomp sweep ({res.out_dir})")
    for c in ["run", "ReLUs", "test acc"] + [f"{g}" for g in groups] + ["max ψ_g", ""]:
        t.add_column(c, justify="left" if c == "run" else "right")
    r0 = reps[0]
    t.add_row("dense", f"{r0['relus']['before']:,}", f"{r0['accuracy']['before']['test']:.2f}%",
              *[f"{r0['group_accuracy']['before'][g]:.2f}%" if r0["group_accuracy"]["before"].get(g) is not None else "-"
                for g in groups], "", "")
    for run, rep in zip(res.runs, reps):
        fair = rep.get("fairness") or {}
        mp = (((fair.get("results") or {}).get("last") or {}).get("test") or {}).get("max_psi")
        ga = rep["group_accuracy"]["after"]
        t.add_row(run["name"], f"{rep['relus']['after']:,}", f"{rep['accuracy']['after']['test']:.2f}%",
                  *[f"{ga[g]:.2f}%" if ga.get(g) is not None else "-" for g in groups],
                  "-" if mp is None else f"{mp:+.2f}", "skipped (done)" if run["name"] in res.skipped else "")
    out_console.print(t)


def report_cmd(
    directory: Path = typer.Argument(..., help="a relucomp sweep --out directory, or a relucomp compile --out directory"),
    budget: Optional[str] = typer.Option(None, "--budget", help="budget of the ψ_g bars (default: the smallest)"),
    inline: bool = typer.Option(False, "--inline", help="embed the figures as base64 (one self-contained file)"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default DIRECTORY/report.html)"),
) -> None:
    """Render DIRECTORY/report.html: group accuracy vs budget, ψ_g bars, ReLUs per layer, PI latency, tables."""
    from .cli import _fail, out_console
    from .errors import RelucompError
    from .report import render_report

    try:
        path = render_report(directory, budget=budget, inline=inline, out=out)
    except RelucompError as exc:
        _fail(exc)
    out_console.print(f"report: {path}")

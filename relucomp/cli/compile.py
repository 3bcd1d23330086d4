"""``relucomp compile``, ``relucomp export``, ``relucomp inspect``, ``relucomp version``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..budget import human
from ..distributed import torchrun_env
from .app import (OVERRIDES, OVERRIDES_HELP, AsJson, BatchSize, BudgetIncludesMaxpool, Checkpoint, ConfigFile,
                  Corruptions, DPAugmult, DPBatchSize, DPDelta, DPEpsilon, DPMaxGradNorm, DPPhase, Device, Effort,
                  EvalRobustness, ExportTarget, ExportWeights, FinetuneEpochs, ImageSize, LeafModule, Limit, Lr,
                  NoProgress, NumClasses, PgdEpsilon, PgdStep, PgdSteps, PretrainEpochs, Pretrained, Replacement,
                  RobustnessSamples, RobustnessSplit, SearchEpochs, Seed, Severities, Target, app, config_overrides,
                  errors_handled, given, help_panels, layer_table, log, merge_overrides, out_console, print_version,
                  quiet_torch_logs, robustness_table)

DEFAULT_OUT = "relucomp-out"


@app.command(context_settings=OVERRIDES, epilog=OVERRIDES_HELP)
@help_panels
def compile(  # noqa: A001
    ctx: typer.Context,
    model: Optional[str] = typer.Argument(None, help="built-in name (resnet18, resnet20...), file.py:factory or "
                                                   "package.module:factory; default: resnet8 trained on the data"),
    relu_budget: Optional[str] = typer.Option(None, "--relu-budget", "-b", help="ReLUs to keep per image: 15000, 15k, 1.5M, 10%"),
    out: Path = typer.Option(Path(DEFAULT_OUT), "--out", "-o", help="output directory"),
    data: str = typer.Option("synthetic", "--data", help="synthetic | utkface:PATH | cifar10:PATH | cifar100:PATH | svhn:PATH | folder:PATH"),
    target: Target = None,
    fair_groups: Optional[str] = typer.Option(None, "--fair-groups", help="group attribute(s), e.g. race or race,gender"),
    granularity: str = typer.Option("pixel", "--granularity", help="gate granularity: pixel | channel | layer"),
    search: str = typer.Option("snl", "--search", help="snl (learned masks) | layer-drop (DeepReDuce-style baseline)"),
    effort: Effort = None,
    epochs: SearchEpochs = None,
    finetune_epochs: FinetuneEpochs = None,
    pretrain_epochs: PretrainEpochs = None,
    replacement: Replacement = "affine",
    checkpoint: Checkpoint = None,
    batch_size: BatchSize = None,
    lr: Lr = 0.01,
    limit: Limit = None,
    image_size: ImageSize = 32,
    seed: Seed = 0,
    fair_method: Optional[str] = typer.Option(None, "--fair-method", help="ceag (default with --fair-groups) | el | nft"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="CEAG: max excess accuracy gap ψ_g per group, in points"),
    fair_phase: str = typer.Option("finetune", "--fair-phase", help="apply the constraints in: finetune | search | both"),
    diagnose: bool = typer.Option(False, "--diagnose", help="add per-group gradient norms and Hessian top eigenvalues"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt after an interruption"),
    no_progress: NoProgress = False,
    device: Device = "cpu",
    prune_channels: Optional[float] = typer.Option(None, "--prune-channels", help="remove this fraction of the prunable (coupled) channels, e.g. 0.5"),
    mac_budget: Optional[str] = typer.Option(None, "--mac-budget", help="prune channels until MACs per image ≤ this: 200M, 1.5G, 50%"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured weight sparsity by gradual magnitude pruning during finetuning, e.g. 0.9"),
    prune_importance: str = typer.Option("l1", "--prune-importance", help="channel importance: l1 | l2 | bn | taylor"),
    replace_maxpool: bool = typer.Option(False, "--replace-maxpool", help="MaxPool → AvgPool before the search (MaxPool comparisons cost like ReLUs in PI; the finetune recovers)"),
    budget_includes_maxpool: BudgetIncludesMaxpool = False,
    export_target: ExportTarget = "pi",
    dp_epsilon: DPEpsilon = None,
    dp_delta: DPDelta = None,
    dp_max_grad_norm: DPMaxGradNorm = None,
    dp_phase: DPPhase = None,
    dp_batch_size: DPBatchSize = None,
    dp_augmult: DPAugmult = None,
    export_weights: ExportWeights = None,
    pretrained: Pretrained = False,
    leaf_module: LeafModule = None,
    eval_robustness: EvalRobustness = False,
    corruptions: Corruptions = None,
    severities: Severities = None,
    robustness_samples: RobustnessSamples = None,
    robustness_split: RobustnessSplit = None,
    pgd_epsilon: PgdEpsilon = None,
    pgd_step: PgdStep = None,
    pgd_steps: PgdSteps = None,
    robust: bool = typer.Option(False, "--robust", help="robust compile (RLNet): two adversarially finetuned "
                                                        "teachers (HAT's; a TRADES β 6 one for the adversarial term "
                                                        "and the student's start) with AugMix-style views (PRIME's "
                                                        "primitives), mask search and finetune on three-way (clean / "
                                                        "corrupted / adversarial) distillation, dual BatchNorm; "
                                                        "reports CA / NPA / AdvA"),
    teacher_robust: bool = typer.Option(False, "--teacher-robust", help="with --robust: MODEL is already robust "
                                                                        "(no adversarial finetune of the teacher)"),
    robust_teacher_epochs: Optional[int] = typer.Option(None, "--robust-teacher-epochs", help="with --robust: "
                                                        "epochs of adversarial finetuning of the teacher (default: "
                                                        "the effort's)"),
    train_attack: Optional[str] = typer.Option(None, "--train-attack", help="with --robust: the teacher's "
                                               "objective, trades (default) | pgd"),
    train_attack_steps: Optional[int] = typer.Option(None, "--train-attack-steps", help="with --robust: PGD steps of "
                                                     "the training attack (default: the effort's; 2 on quick)"),
    trades_beta: Optional[float] = typer.Option(None, "--trades-beta", help="with --robust: TRADES β of the robust "
                                                "teacher (default 2.5, with HAT's helper term; the adversarial "
                                                "term's teacher: robustness.adv_teacher_beta, 6)"),
    export_branch: Optional[str] = typer.Option(None, "--export-branch", help="with --robust: the dual-BN branch "
                                                "folded into the export, clean (default) | perturbed"),
    nproc: int = typer.Option(1, "--nproc", help="training processes on this machine (torch.distributed, DDP; starts "
                                                 "torchrun itself); the global --batch-size is split over them"),
    amp: str = typer.Option("none", "--amp", help="mixed precision: none | bf16 | fp16 (CUDA only); gates, L1 and KD "
                                                  "terms stay fp32"),
    workers: int = typer.Option(0, "--workers", help="DataLoader worker processes for the training data (0: the "
                                                     "in-memory loader, fastest on CPU)"),
    config: ConfigFile = None,
    print_config: bool = typer.Option(False, "--print-config", help="print the resolved configuration (TOML) and exit"),
) -> None:
    """Compress MODEL to a ReLU budget and write OUT/model.onnx (and/or OUT/model.edge.onnx), OUT/model.pt, OUT/report.json."""
    from ..config import load_config, resolve_config, to_toml, validate

    flags = given(ctx, skip=("model", "data", "config", "print_config"))
    with errors_handled():
        model, dotted = config_overrides(ctx, model)
        if model is not None:
            flags["model.spec"] = model
        if ctx.get_parameter_source("data").name == "COMMANDLINE":
            flags["data.spec"] = data
        overrides = merge_overrides(flags, dotted)
        cfg = load_config(config)
        if "out_dir" not in overrides and "runtime.out_dir" not in overrides and cfg.runtime.out_dir is None:
            overrides["out_dir"] = DEFAULT_OUT
        if config is None and "data.spec" not in overrides:
            overrides["data.spec"] = data
        cfg = resolve_config(cfg, overrides)
        if print_config:
            sys.stdout.write(to_toml(cfg))
            return
        validate(cfg)  # every option, before torch is even imported for the run
        if cfg.runtime.nproc > 1 and torchrun_env() is None:  # start the processes: torchrun runs this same config
            raise typer.Exit(launch_config(cfg))
        quiet_torch_logs()
        from ..api import compile as compile_api

        main_rank = os.environ.get("RANK", "0") in ("", "0")
        if not main_rank:  # multi-process: warnings and logs from rank 0 only
            import warnings

            warnings.simplefilter("ignore")
        res = compile_api(config=cfg, log=log)
    if main_rank:  # multi-process: rank 0 reports
        print_summary(res.report)


def launch_config(cfg) -> int:
    """``relucomp compile --nproc N``: run the resolved config under ``torchrun`` (N processes); its exit status."""
    import tempfile

    from ..config import to_toml
    from ..distributed import launch

    with tempfile.TemporaryDirectory(prefix="relucomp-launch-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(to_toml(cfg), encoding="utf-8")
        return launch(cfg.runtime.nproc, ["compile", "--config", str(path)])


def print_summary(rep) -> None:
    """The compile summary tables, read through the typed report."""
    out_console.print(layer_table("ReLUs per layer", rep.per_layer, before_after=True))
    t = Table(title="relucomp compile")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("ReLUs", f"{rep.relus_before:,}", f"{rep.relus_after:,} (budget {rep.budget:,})")
    t.add_row("MACs", human(rep.macs["before"]), human(rep.macs["after"]))
    if rep.pruning:
        t.add_row("params", f"{rep.params['before']:,}", f"{rep.params['after']:,}")
        sp = rep.pruning.get("sparsity")
        if sp:
            t.add_row("weight sparsity", "", f"{100 * sp['achieved']:.1f}% (target {100 * sp['target']:.0f}%)")
    t.add_row("val accuracy", f"{rep.accuracy['before']['val']:.2f}%", f"{rep.accuracy['after']['val']:.2f}%")
    t.add_row("test accuracy", f"{rep.test_accuracy[0]:.2f}%", f"{rep.test_accuracy[1]:.2f}%")
    ga = rep.group_accuracy
    for gname in rep.group_names:
        b, a = ga["before"].get(gname), ga["after"].get(gname)
        n = ga.get("test_counts", {}).get(gname, 0)
        t.add_row(f"  group {gname} (n={n})", "-" if b is None else f"{b:.2f}%", "-" if a is None else f"{a:.2f}%")
    if rep.dp is not None:
        d = rep.dp
        eps = "∞ (no noise: no guarantee)" if d.epsilon_spent is None else f"{d.epsilon_spent:.3f} (target {d.epsilon_target:g})"
        t.add_row("DP-SGD finetune", "", f"ε spent {eps}, δ {d.delta:.1e}, σ {d.noise_multiplier:.3f}, "
                  f"C {d.max_grad_norm:g}, q {d.sample_rate:.4f}, {d.steps} steps"
                  + (f", augmult {d.augmult}" if d.augmult > 1 else ""))
    for target, e in (rep.exports or ({"pi": rep.export} if rep.export else {})).items():
        t.add_row(f"ONNX ({target})", "", export_line(e, f", {rep.export_weights} weights"))
    out_console.print(t)
    if rep.robustness:
        out_console.print(robustness_table(rep.robustness_result))
    fair = rep.fairness or {}
    test = rep.fairness_test()
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    if test:
        ft = Table(title=f"fairness ({fair.get('method')}, ε = {fair.get('tolerance')} pts; test set)")
        rg = (rep.robustness or {}).get("models", {}).get("compiled", {}).get("groups", {})
        rob = ("NPA compiled", "AdvA compiled") if rg else ()   # --eval-robustness / --robust: per-group columns
        for col in ("group", "n", "acc dense", "acc compiled", "Δ_g", "ψ_g") + rob:
            ft.add_column(col, justify="right" if col != "group" else "left")
        for gname, r in test["groups"].items():
            extra = [f((rg.get(gname) or {}).get(k)) for k in ("npa", "adva")] if rob else []
            ft.add_row(gname, str(r["count"]), f(r["acc_dense"]), f(r["acc_compiled"]), f(r["delta"]), f(r["psi"]),
                       *extra)
        out_console.print(ft)
        for w, wres in (fair.get("results") or {}).items():
            for split in ("train", "test"):
                r = wres.get(split) or {}
                if r.get("max_psi") is not None:
                    out_console.print(f"  {w:4s} {split:5s}: max ψ_g = {r['max_psi']:.2f}, Ψ_PW = {r['psi_pw']:.2f}, "
                                      f"accuracy {r['overall']['acc_compiled']:.2f}%")
    diag = rep.diagnostics
    if diag:
        dt = Table(title="group diagnostics (validation set): who gets hurt")
        for col in ("group", "‖∇J‖ dense", "‖∇J‖ compiled", "λ_max(H) dense", "λ_max(H) compiled"):
            dt.add_column(col, justify="right" if col != "group" else "left")
        g3 = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        for gname in diag["dense"]["group_names"]:
            dt.add_row(gname, g3(diag["dense"]["grad_norm"].get(gname)), g3(diag["compiled"]["grad_norm"].get(gname)),
                       g3(diag["dense"]["hessian_top_eig"].get(gname)), g3(diag["compiled"]["hessian_top_eig"].get(gname)))
        out_console.print(dt)
    out_console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in rep.phases_seconds.items()))


def export_line(e: dict, extra: str = "") -> str:
    """One line per written ONNX file: the ReLUs its graph keeps (pi; an edge file is plaintext, its budget is not
    checked), the onnxruntime check, ``extra``, and for edge what its partially linearized layers cost."""
    from ..export_targets import edge_note

    edge = e.get("export_target") == "edge"
    what = "plaintext" if edge else f"{e['onnx_relus']:,} ReLUs in graph"
    note = edge_note(e.get("partial_layers", 0)) if edge else ""
    return f"{e['path']} ({what}, ort |diff| {e['ort_max_abs_diff']:.1e}{extra})" + (f"; {note}" if note else "")


@app.command("export")
def export_cmd(
    out: Path = typer.Argument(..., help="the --out directory of a finished relucomp compile (holds model.pt)"),
    export_target: ExportTarget = "both",
) -> None:
    """Export a compiled model (OUT/model.pt) for pi and/or edge without retraining."""
    from ..export_targets import export_compiled

    quiet_torch_logs()
    with errors_handled():
        res = export_compiled(out, export_target)
    for target, e in res.items():
        out_console.print(f"{target}: {export_line(e)}")


@app.command()
def inspect(
    target: str = typer.Argument(..., help="model name / file.py:factory / module:factory, or a .onnx file"),
    num_classes: NumClasses = 10,
    image_size: ImageSize = 32,
    checkpoint: Checkpoint = None,
    as_json: AsJson = False,
) -> None:
    """Per-layer ReLU and MAC table of a model or an ONNX file."""
    from ..api import inspect as inspect_api

    quiet_torch_logs()
    with errors_handled():
        info = inspect_api(target, num_classes=num_classes, image_size=image_size, checkpoint=checkpoint)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    out_console.print(layer_table(f"{info['model']}", info["layers"]))
    tot = info["total"]
    other = {k: v for k, v in (tot.get("comparisons_by_op") or {}).items() if k not in ("Relu", "MaxPool", "GlobalMaxPool")}
    out_console.print(f"[bold]total:[/] {tot['relus_kept']:,} ReLUs, {tot['macs']:,} MACs ({human(tot['macs'])}), "
                      f"{tot['params']:,} params" + (f", {tot['maxpool_comparisons']:,} MaxPool comparisons (PI pays for these too)"
                                                      if tot.get("maxpool_comparisons") else "")
                      + (", other comparisons: " + ", ".join(f"{k} {v:,}" for k, v in other.items()) if other else "")
                      + (f", {tot['comparisons']:,} comparisons no gate controls"
                         + (f" (incl. {tot['hidden_relus']:,} ReLUs hidden in leaf modules)" if tot.get("hidden_relus") else "")
                         if tot.get("comparisons") and "comparisons_by_op" not in tot else ""))
    from ..export_targets import describe

    line = describe(info.get("metadata") or {})
    if line:
        out_console.print(line)


@app.command()
def version() -> None:
    """Print the relucomp version."""
    print_version()


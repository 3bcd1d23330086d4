"""``relucomp`` command line: typer parses, then calls the keyword-only library functions.

User errors (:class:`~relucomp.errors.RelucompError`) print a one-line cause
and its fix and exit with status 2; no torch traceback reaches the user.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .budget import human
from .errors import RelucompError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile PyTorch models to a ReLU budget for private inference, fairly, to verified ONNX.")
console = Console(stderr=True)
out_console = Console()


def _fail(exc: RelucompError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc.cause))}")
    if exc.fix:
        console.print(f"  [bold]fix:[/] {escape(str(exc.fix))}")
    raise typer.Exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def _quiet_torch_logs() -> None:
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _layer_table(title: str, rows: list[dict], *, before_after: bool = False) -> Table:
    t = Table(title=title, show_lines=False)
    t.add_column("layer")
    t.add_column("kind")
    t.add_column("shape")
    if before_after:
        t.add_column("ReLUs before", justify="right")
        t.add_column("ReLUs after", justify="right")
        t.add_column("kept", justify="right")
        for r in rows:
            b, a = r["relus_before"], r["relus_after"]
            t.add_row(r["site"], "relu", "×".join(map(str, r["shape"])), f"{b:,}", f"{a:,}",
                      f"{100 * a / b:.1f}%" if b else "-")
        return t
    t.add_column("ReLUs", justify="right")
    t.add_column("MACs", justify="right")
    for r in rows:
        relus = r["relus_kept"] if r["kind"] != "relu" else r["relus"]
        t.add_row(r["name"], r["kind"], "×".join(map(str, r["shape"])), f"{relus:,}" if relus else "",
                  human(r["macs"]) if r["macs"] else "")
    return t


@app.command()
def compile(  # noqa: A001
    model: Optional[str] = typer.Argument(None, help="built-in name (resnet18, resnet20...), file.py:factory or "
                                                   "package.module:factory; default: resnet8 trained on the data"),
    relu_budget: str = typer.Option(..., "--relu-budget", "-b", help="ReLUs to keep per image: 15000, 15k, 1.5M, 10%"),
    out: Path = typer.Option(Path("relucomp-out"), "--out", "-o", help="output directory"),
    data: str = typer.Option("synthetic", "--data", help="synthetic | utkface:PATH | cifar10:PATH | cifar100:PATH | svhn:PATH | folder:PATH"),
    target: Optional[str] = typer.Option(None, "--target", help="label to predict (data-set specific)"),
    fair_groups: Optional[str] = typer.Option(None, "--fair-groups", help="group attribute(s), e.g. race or race,gender"),
    granularity: str = typer.Option("pixel", "--granularity", help="gate granularity: pixel | channel | layer"),
    search: str = typer.Option("snl", "--search", help="snl (learned masks) | layer-drop (DeepReDuce-style baseline)"),
    epochs: int = typer.Option(4, "--epochs", help="mask-search epochs"),
    finetune_epochs: int = typer.Option(4, "--finetune-epochs", help="finetune epochs with fixed masks"),
    pretrain_epochs: Optional[int] = typer.Option(None, "--pretrain-epochs", help="train an untrained built-in model first (default 15; cached)"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="state_dict for MODEL"),
    batch_size: int = typer.Option(128, "--batch-size"),
    lr: float = typer.Option(0.01, "--lr"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use at most this many images (quick runs)"),
    image_size: int = typer.Option(32, "--image-size"),
    seed: int = typer.Option(0, "--seed"),
    fair_method: Optional[str] = typer.Option(None, "--fair-method", help="ceag (default with --fair-groups) | el | nft"),
    tolerance: float = typer.Option(2.0, "--tolerance", help="CEAG: max excess accuracy gap ψ_g per group, in points"),
    fair_phase: str = typer.Option("finetune", "--fair-phase", help="apply the constraints in: finetune | search | both"),
    diagnose: bool = typer.Option(False, "--diagnose", help="add per-group gradient norms and Hessian top eigenvalues"),
    resume: bool = typer.Option(False, "--resume", help="continue from OUT/checkpoint.pt after an interruption"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    prune_channels: Optional[float] = typer.Option(None, "--prune-channels", help="remove this fraction of the prunable (coupled) channels, e.g. 0.5"),
    mac_budget: Optional[str] = typer.Option(None, "--mac-budget", help="prune channels until MACs per image ≤ this: 200M, 1.5G, 50%"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured weight sparsity by gradual magnitude pruning during finetuning, e.g. 0.9"),
    prune_importance: str = typer.Option("l1", "--prune-importance", help="channel importance: l1 | l2 | bn | taylor"),
    replace_maxpool: bool = typer.Option(False, "--replace-maxpool", help="MaxPool → AvgPool before the search (MaxPool comparisons cost like ReLUs in PI; the finetune recovers)"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="finetune under DP-SGD (opacus) to this ε w.r.t. the training split; inf = clipping without noise"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP δ, < 1/n (default min(1e-5, 0.1/n))"),
    dp_max_grad_norm: float = typer.Option(1.0, "--dp-max-grad-norm", help="per-sample gradient clipping norm C"),
    dp_phase: str = typer.Option("finetune", "--dp-phase", help="which phase runs under DP: finetune (search|both: not implemented)"),
    dp_batch_size: Optional[int] = typer.Option(None, "--dp-batch-size", help="expected (Poisson) batch size under DP (default max(--batch-size, 256))"),
    export_weights: Optional[str] = typer.Option(None, "--export-weights", help="weights written to ONNX: last | ema (default ema under DP, else last)"),
) -> None:
    """Compress MODEL to a ReLU budget and write OUT/model.onnx, OUT/model.pt, OUT/report.json."""
    from .api import compile as compile_api
    from .train import Interrupted

    _quiet_torch_logs()
    try:
        res = compile_api(model, data, relu_budget=relu_budget, granularity=granularity, search=search,
                          search_epochs=epochs, finetune_epochs=finetune_epochs, pretrain_epochs=pretrain_epochs,
                          checkpoint=checkpoint, batch_size=batch_size, lr=lr, target=target, fair_groups=fair_groups,
                          limit=limit, image_size=image_size, seed=seed, out_dir=out, resume=resume,
                          fair_method=fair_method, tolerance=tolerance, fair_phase=fair_phase, diagnose=diagnose,
                          prune_channels=prune_channels, mac_budget=mac_budget, sparsity=sparsity,
                          prune_importance=prune_importance, replace_maxpool=replace_maxpool,
                          dp_epsilon=dp_epsilon, dp_delta=dp_delta, dp_max_grad_norm=dp_max_grad_norm,
                          dp_phase=dp_phase, dp_batch_size=dp_batch_size, export_weights=export_weights,
                          progress=not no_progress, device=device, log=lambda s: console.print(f"[dim]{s}[/]"))
    except Interrupted as exc:
        console.print(f"[yellow]{exc.cause}[/]\n  [bold]resume:[/] {exc.fix}")
        raise typer.Exit(130)
    except RelucompError as exc:
        _fail(exc)
    _print_compile_summary(res.report)


def _print_compile_summary(rep: dict) -> None:
    out_console.print(_layer_table("ReLUs per layer", rep["per_layer"], before_after=True))
    t = Table(title="relucomp compile")
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_row("ReLUs", f"{rep['relus']['before']:,}", f"{rep['relus']['after']:,} (budget {rep['relus']['budget']:,})")
    t.add_row("MACs", human(rep["macs"]["before"]), human(rep["macs"]["after"]))
    if rep.get("pruning"):
        t.add_row("params", f"{rep['params']['before']:,}", f"{rep['params']['after']:,}")
        sp = rep["pruning"].get("sparsity")
        if sp:
            t.add_row("weight sparsity", "", f"{100 * sp['achieved']:.1f}% (target {100 * sp['target']:.0f}%)")
    t.add_row("val accuracy", f"{rep['accuracy']['before']['val']:.2f}%", f"{rep['accuracy']['after']['val']:.2f}%")
    t.add_row("test accuracy", f"{rep['accuracy']['before']['test']:.2f}%", f"{rep['accuracy']['after']['test']:.2f}%")
    ga = rep.get("group_accuracy", {})
    for gname in ga.get("groups", []):
        b, a = ga["before"].get(gname), ga["after"].get(gname)
        n = ga.get("test_counts", {}).get(gname, 0)
        t.add_row(f"  group {gname} (n={n})", "-" if b is None else f"{b:.2f}%", "-" if a is None else f"{a:.2f}%")
    if "export" in rep:
        e = rep["export"]
        t.add_row("ONNX", "", f"{e['path']} ({e['onnx_relus']:,} ReLUs in graph, ort |diff| {e['ort_max_abs_diff']:.1e})")
    out_console.print(t)
    fair = rep.get("fairness") or {}
    res = (fair.get("results") or {}).get("last", {})
    if res.get("test"):
        ft = Table(title=f"fairness ({fair.get('method')}, ε = {fair.get('tolerance')} pts; test set)")
        for col in ("group", "n", "acc dense", "acc compiled", "Δ_g", "ψ_g"):
            ft.add_column(col, justify="right" if col != "group" else "left")
        for gname, r in res["test"]["groups"].items():
            f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            ft.add_row(gname, str(r["count"]), f(r["acc_dense"]), f(r["acc_compiled"]), f(r["delta"]), f(r["psi"]))
        out_console.print(ft)
        for w, wres in (fair.get("results") or {}).items():
            for split in ("train", "test"):
                r = wres.get(split) or {}
                if r.get("max_psi") is not None:
                    out_console.print(f"  {w:4s} {split:5s}: max ψ_g = {r['max_psi']:.2f}, Ψ_PW = {r['psi_pw']:.2f}, "
                                      f"accuracy {r['overall']['acc_compiled']:.2f}%")
    diag = rep.get("diagnostics")
    if diag:
        dt = Table(title="group diagnostics (validation set): who gets hurt")
        for col in ("group", "‖∇J‖ dense", "‖∇J‖ compiled", "λ_max(H) dense", "λ_max(H) compiled"):
            dt.add_column(col, justify="right" if col != "group" else "left")
        f = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        for gname in diag["dense"]["group_names"]:
            dt.add_row(gname, f(diag["dense"]["grad_norm"].get(gname)), f(diag["compiled"]["grad_norm"].get(gname)),
                       f(diag["dense"]["hessian_top_eig"].get(gname)), f(diag["compiled"]["hessian_top_eig"].get(gname)))
        out_console.print(dt)
    ph = rep.get("phases_seconds", {})
    out_console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in ph.items()))


@app.command()
def inspect(
    target: str = typer.Argument(..., help="model name / file.py:factory / module:factory, or a .onnx file"),
    num_classes: int = typer.Option(10, "--num-classes"),
    image_size: int = typer.Option(32, "--image-size"),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """Per-layer ReLU and MAC table of a model or an ONNX file."""
    from .api import inspect as inspect_api

    _quiet_torch_logs()
    try:
        info = inspect_api(target, num_classes=num_classes, image_size=image_size, checkpoint=checkpoint)
    except RelucompError as exc:
        _fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2, default=str) + "\n")
        return
    out_console.print(_layer_table(f"{info['model']}", info["layers"]))
    tot = info["total"]
    out_console.print(f"[bold]total:[/] {tot['relus_kept']:,} ReLUs, {tot['macs']:,} MACs ({human(tot['macs'])}), "
                      f"{tot['params']:,} params" + (f", {tot['maxpool_comparisons']:,} MaxPool comparisons (PI pays for these too)"
                                                      if tot.get("maxpool_comparisons") else ""))


@app.command()
def version() -> None:
    """Print the relucomp version."""
    from . import __version__

    out_console.print(__version__)


from .cli_report import report_cmd, sweep_cmd  # noqa: E402

app.command("sweep")(sweep_cmd)
app.command("report")(report_cmd)

from .cli_pi import estimate_cmd, pi_bench_cmd  # noqa: E402

app.command("pi-bench")(pi_bench_cmd)
app.command("estimate")(estimate_cmd)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

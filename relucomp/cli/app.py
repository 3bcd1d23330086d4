"""The typer app, the shared options and the one error handler of the ``relucomp`` command line.

Command modules (:mod:`.compile`, :mod:`.sweep`, :mod:`.pi`) import this
module only; they parse options and call keyword-only library functions.
User errors (:class:`~relucomp.errors.RelucompError`) print ``error:`` /
``fix:`` and exit 2; relucomp bugs (:class:`~relucomp.errors.InternalError`)
say so, say how to report them and exit 3; Ctrl-C exits 130.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..budget import human
from ..errors import (BUG_REPORT, INTERNAL_ERROR_EXIT, INTERRUPTED_EXIT, USER_ERROR_EXIT, AlreadyFinished,
                      ConfigError, InternalError, Interrupted, RelucompError)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Compile PyTorch models to a ReLU budget for private inference, fairly, to verified ONNX.")
console = Console(stderr=True)
out_console = Console()


def print_version() -> None:
    """``relucomp version`` and ``relucomp --version``."""
    from .. import __version__

    out_console.print(__version__)


def _print_version(value: bool) -> None:
    if value:
        print_version()
        raise typer.Exit()


@app.callback()
def _root(_version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True, help="print the relucomp version and exit")] = False,
          ) -> None:
    """Compile PyTorch models to a ReLU budget for private inference, fairly, to verified ONNX."""

# -- options shared by several commands (one definition each) ------------------------------------
Target = Annotated[Optional[str], typer.Option("--target", help="label to predict (data-set specific)")]
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="state_dict for MODEL")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="default: from --effort (128)")]
Effort = Annotated[Optional[str], typer.Option(
    "--effort", help="schedule preset: quick (default; CPU demo, 15/3/3 pretrain/search/finetune epochs) | standard "
                     "(30/10/10) | paper (SNL's 200/100/100, for a GPU); explicit epochs / --batch-size override it")]
SearchEpochs = Annotated[Optional[int], typer.Option("--epochs", help="mask-search epochs (default: from --effort)")]
FinetuneEpochs = Annotated[Optional[int], typer.Option(
    "--finetune-epochs", help="finetune epochs with fixed masks (default: from --effort)")]
PretrainEpochs = Annotated[Optional[int], typer.Option(
    "--pretrain-epochs", help="train an untrained model first (default: from --effort; cached; the default model on "
                              "the default data ships trained)")]
Replacement = Annotated[str, typer.Option(
    "--replacement", help="removed ReLUs become: affine (learned per-channel s·x+b, no comparison; default) | "
                          "identity (SNL)")]
Lr = Annotated[float, typer.Option(
    "--lr", help="the weights' SGD learning rate during the mask search (the gates' is --search.alpha_lr; the "
                 "finetune's --finetune.lr)")]
Limit = Annotated[Optional[int], typer.Option("--limit", help="use at most this many images (quick runs)")]
ImageSize = Annotated[int, typer.Option(
    "--image-size", help="input height = width in pixels (data images are resized to it)")]
NumClasses = Annotated[int, typer.Option("--num-classes", help="output classes of a built-in model")]
Seed = Annotated[int, typer.Option("--seed", help="seed of the data split, initialisation and batch order")]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="no progress bars")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
Pretrained = Annotated[bool, typer.Option("--pretrained", help="MODEL (file.py:factory) returns trained weights: "
                                                               "do not pretrain it")]
LeafModule = Annotated[Optional[list[str]], typer.Option(
    "--leaf-module", help="keep this nn.Module class opaque to the tracer (ClassName from MODEL's file, or "
                          "module:ClassName); repeatable")]
BudgetIncludesMaxpool = Annotated[bool, typer.Option(
    "--budget-includes-maxpool", help="count MaxPool comparisons against the ReLU budget (the gates get what is "
                                      "left; the export check counts them too)")]
# robustness evaluation (relucomp.robustness): compile --eval-robustness and relucomp evaluate
EvalRobustness = Annotated[bool, typer.Option(
    "--eval-robustness", help="measure clean (CA), corrupted (NPA, CIFAR-10-C) and PGD (AdvA) accuracy of the dense "
                              "and compiled model, overall and per group")]
Corruptions = Annotated[Optional[str], typer.Option(
    "--corruptions", help="all (the 15 CIFAR-10-C corruptions), families (noise, blur, weather, digital, extra) or "
                          "names, comma-separated")]
Severities = Annotated[Optional[str], typer.Option("--severities", help="corruption severities, e.g. 1,3,5 (default 1-5)")]
RobustnessSamples = Annotated[Optional[int], typer.Option(
    "--robustness-samples", help="evaluate robustness on this many images of the split (seeded subset; default 1000)")]
RobustnessSplit = Annotated[Optional[str], typer.Option(
    "--robustness-split", help="the split robustness is measured on: test (default; what you report) | val (what "
                               "you tune robust settings on)")]
PgdEpsilon = Annotated[Optional[str], typer.Option("--pgd-epsilon", help="PGD L∞ radius in pixel units, e.g. 8/255")]
PgdStep = Annotated[Optional[str], typer.Option("--pgd-step", help="PGD step, e.g. 2/255")]
PgdSteps = Annotated[Optional[int], typer.Option("--pgd-steps", help="PGD iterations (default 10)")]
ExportTarget = Annotated[str, typer.Option(
    "--export-target", help="pi: OUT/model.onnx (PI-ready: Relu only on kept elements) | edge: OUT/model.edge.onnx "
                            "(plaintext runtimes: onnxruntime, mobile) | both")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="TOML config file (e.g. OUT/config.toml to "
                                                                     "replay a run); flags override its values")]

# differential privacy (relucomp.dp; compile and sweep)
DPEpsilon = Annotated[Optional[float], typer.Option(
    "--dp-epsilon", help="finetune under DP-SGD (opacus) to this ε w.r.t. the training split; inf = clipping, no noise")]
DPDelta = Annotated[Optional[float], typer.Option("--dp-delta", help="DP δ, < 1/n (default min(1e-5, 0.1/n))")]
DPMaxGradNorm = Annotated[Optional[str], typer.Option(
    "--dp-max-grad-norm", help="per-sample gradient clipping norm C (default 1.0), or auto: the 80th percentile of "
                               "the validation split's per-sample gradient norms at the DP finetune's start")]
DPPhase = Annotated[Optional[str], typer.Option("--dp-phase", help="phases under DP-SGD: finetune (default) | search | both (one ε over search + finetune)")]
DPBatchSize = Annotated[Optional[int], typer.Option("--dp-batch-size",
                                                    help="expected (Poisson) batch under DP (default max(--batch-size, 256))")]
DPAugmult = Annotated[Optional[int], typer.Option(
    "--dp-augmult", help="augmentation multiplicity under DP: each sampled image's gradient is averaged over this "
                         "many random crops/flips before clipping (De et al.; same ε, K× the compute; default 1)")]
ExportWeights = Annotated[Optional[str], typer.Option("--export-weights",
                                                      help="weights in model.onnx / model.pt: last | ema (default ema under DP)")]

#: CLI parameter names that differ from the library keywords
RENAMES = {"epochs": "search_epochs", "out": "out_dir", "leaf_module": "leaf_modules"}


def given(ctx: typer.Context, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The options the user actually typed (not defaults), under their library keyword names."""
    out: dict[str, Any] = {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if name in skip or source is None or source.name != "COMMANDLINE":
            continue
        if name == "no_progress":
            out["progress"] = not value
        else:
            out[RENAMES.get(name, name)] = str(value) if isinstance(value, Path) else value
    return out


#: ``--help`` panel of each config section (a command's options are grouped by the section they set)
PANELS = {"data": "Data", "model": "Model", "search": "Mask search", "finetune": "Finetune",
          "fairness": "Fairness", "robustness": "Robustness", "dp": "Differential privacy",
          "pruning": "Pruning", "export": "Export", "runtime": "Run"}


def help_panels(fn):
    """Group ``fn``'s options in ``--help`` by the config section each sets (``KEYWORDS``): one panel per section.

    Options that set no config field (``--config``, ``--print-config``, ...) stay under "Options".  The
    shared option objects are copied, so other commands' ``--help`` is left as it was.
    """
    import copy
    import typing

    from ..keywords import KEYWORDS

    def panel(info: Any, section: str) -> Any:
        if not isinstance(info, typer.models.OptionInfo):
            return info
        info = copy.copy(info)
        info.rich_help_panel = f"{PANELS[section]} · " + escape(f"[{section}]")
        return info

    hints = typing.get_type_hints(fn, include_extras=True)
    sig = inspect.signature(fn)
    params = []
    for name, param in sig.parameters.items():
        dotted = ({"data": "data.spec", "no_progress": "runtime.progress"}.get(name)
                  or KEYWORDS.get(RENAMES.get(name, name), ""))
        section = dotted.partition(".")[0]
        hint = hints.get(name, param.annotation)
        if section in PANELS:
            if typing.get_origin(hint) is Annotated:
                hint = Annotated[(hint.__origin__, *(panel(m, section) for m in hint.__metadata__))]
            param = param.replace(default=panel(param.default, section))
        params.append(param.replace(annotation=hint))
    fn.__signature__ = sig.replace(parameters=params)
    return fn


#: context settings of the commands that take config overrides (``--section.field VALUE``, as spaCy's CLI)
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
OVERRIDES_HELP = ("Any config option can be set as --section.field VALUE (or --section.field=VALUE), e.g. "
                  "--robustness.teacher_lr 0.005; `relucomp compile --print-config` lists them all. Values are "
                  "read as TOML (numbers, true/false, [lists]), else as text; null resets an option to its default.")


def _override_value(raw: str) -> Any:
    if raw == "null":
        return None
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def config_overrides(ctx: typer.Context, model: str | None = None) -> tuple[str | None, dict[str, Any]]:
    """``(MODEL, {"section.field": value})`` from the words left after the command's own options.

    The commands with :data:`OVERRIDES` pass unknown words through; an override given before MODEL was taken
    for MODEL by the parser (and MODEL left among the words): both are put right here.  Anything that is not
    ``--section.field [VALUE]`` with a known section and field is a :class:`~relucomp.errors.ConfigError`
    naming the closest option.
    """
    from ..config import field_keys, is_flag, split_key
    from ..keywords import KEYWORDS

    args = list(ctx.args)
    if model is not None and model.startswith("-"):
        args.insert(0, model)
        model = None
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        word = args[i]
        name, eq, raw = word.partition("=")
        bare = name[2:].replace("-", "_")
        if model is None and not word.startswith("-"):  # MODEL after an override the parser took for it
            model, i = word, i + 1
            continue
        if not name.startswith("--") or "." not in name:
            opts = [o for p in ctx.command.params for o in getattr(p, "opts", []) if o.startswith("--")]
            if not word.startswith("-"):
                raise ConfigError(f"unexpected argument {word!r}",
                                  "give MODEL once; options take their value after them (relucomp "
                                  f"{ctx.command.name} --help)")
            flag_for = {KEYWORDS[p.name]: long[0] for p in ctx.command.params if p.name in KEYWORDS
                        if (long := [o for o in getattr(p, "opts", []) if o.startswith("--")])}
            close = list(dict.fromkeys(
                [flag_for.get(k, f"--{k}") for k in field_keys(bare)]  # a config field without its section
                + [o for o in opts if o.endswith("-" + name[2:])]))[:3]  # a flag that names it with a prefix
            close = close or difflib.get_close_matches(name, opts, n=1, cutoff=0.6)
            listed = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else "".join(close)
            hint = f"did you mean {listed}? " if close else ""
            raise ConfigError(f"no such option: {name}", hint
                              + f"see relucomp {ctx.command.name} --help; config options go as --section.field VALUE")
        sec, field = split_key(bare)
        key = f"{sec}.{field}"
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw, i = args[i + 1], i + 1
            elif is_flag(key):
                raw = "true"
            else:
                raise ConfigError(f"--{key} needs a value", f"give it as --{key} VALUE or --{key}=VALUE")
        if key in out:
            raise ConfigError(f"config option {key} given twice", "give it once")
        out[key] = _override_value(raw)
        i += 1
    return model, out


def merge_overrides(flags: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    """The flags' and the ``--section.field`` overrides together; one option given both ways is refused."""
    from ..keywords import KEYWORDS

    for kw in flags:
        key = KEYWORDS.get(kw, kw)
        if key in dotted:
            flag = {"model.spec": "MODEL", "data.spec": "--data"}.get(kw) or \
                "--" + next((k for k, v in RENAMES.items() if v == kw), kw).replace("_", "-")
            raise ConfigError(f"{key} given twice (as {flag} and as --{key})", "give it once")
    return {**flags, **dotted}


def log(s: str) -> None:
    console.print(f"[dim]{escape(s)}[/]")


def fail(exc: RelucompError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc.cause))}")
    if exc.fix:
        console.print(f"  [bold]fix:[/] {escape(str(exc.fix))}")
    raise typer.Exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def errors_handled(interrupted_fix: str | None = None) -> Iterator[None]:
    """Turn relucomp's exceptions into messages and exit statuses (no tracebacks for users)."""
    try:
        yield
    except Interrupted as exc:
        console.print(f"[yellow]{escape(exc.cause)}[/]\n  [bold]resume:[/] {escape(interrupted_fix or exc.fix or '')}")
        raise typer.Exit(INTERRUPTED_EXIT)
    except AlreadyFinished as exc:
        console.print(f"[green]{escape(exc.cause)}[/]\n  {escape(exc.fix or '')}")
        raise typer.Exit(0)
    except RelucompError as exc:
        fail(exc)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        raise typer.Exit(INTERRUPTED_EXIT)
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - InternalError, or any other failure: a relucomp bug
        if os.environ.get("RELUCOMP_DEBUG"):
            raise
        what = str(exc) if isinstance(exc, InternalError) else f"{type(exc).__name__}: {exc}"
        console.print(f"[bold red]internal error:[/] {escape(what.splitlines()[0] if what else '')}\n"
                      f"  [bold]{escape(BUG_REPORT)}[/] (RELUCOMP_DEBUG=1 shows the traceback)")
        raise typer.Exit(INTERNAL_ERROR_EXIT)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def quiet_torch_logs() -> None:
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    logging.getLogger("torch._export").setLevel(logging.ERROR)
    warnings.showwarning = _show_warning
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def layer_table(title: str, rows: list[dict], *, before_after: bool = False) -> Table:
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
    t.add_column("other comparisons (not gated)", justify="right")
    for r in rows:
        relus = r["relus_kept"] if r["kind"] != "relu" else r["relus"]
        cmp = 0 if r["kind"] in ("relu", "gate", "sparse_relu") else r.get("comparisons", 0) + r.get("maxpool_comparisons", 0)
        hidden = f" ({r['hidden_relus']:,} hidden ReLUs)" if r.get("hidden_relus") else ""
        t.add_row(r["name"], r["kind"], "×".join(map(str, r["shape"])), f"{relus:,}" if relus else "",
                  human(r["macs"]) if r["macs"] else "", f"{cmp:,} {r.get('op', '')}{hidden}".strip() if cmp else "")
    return t


def value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    t = Table(title=title)
    t.add_column("")
    t.add_column("value", justify="right")
    for k, v in rows:
        t.add_row(k, v)
    return t


def mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB"


def robustness_table(res) -> Table:
    """CA / NPA / AdvA per model (and group), from the report's typed robustness section."""
    s = res.settings
    t = Table(title=f"robustness ({res.samples} {s.get('split', 'test')} images; NPA: {len(s['corruptions'])} corruptions × "
                    f"severities {','.join(map(str, s['severities']))}; AdvA: PGD L∞ ε={s['pgd_epsilon'] * 255:.3g}/255, "
                    f"{s['pgd_steps']} steps)")
    for c in ("model", "CA", "NPA", "AdvA"):
        t.add_column(c, justify="left" if c == "model" else "right")
    f = lambda v: "-" if v is None else f"{v:.2f}%"  # noqa: E731
    for name, m in res.models.items():
        t.add_row(name, f(m.ca), f(m.npa), f(m.adva))
        if len(m.groups) > 1:
            for g, v in m.groups.items():
                t.add_row(f"  group {g} (n={res.group_counts.get(g, 0)})", f(v["ca"]), f(v["npa"]), f(v["adva"]))
    return t

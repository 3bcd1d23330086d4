"""The library API.  The CLI is a thin layer over these keyword-only functions.

* :func:`compile` — a short driver: resolve the config, validate it up front,
  run the stages of :mod:`relucomp.stages` (data → model → pretrain → dense
  evaluation → gates → search → prune → finetune → lower/fold → evaluate →
  fairness → diagnose → report → export → save).
* :func:`inspect` — per-layer ReLU / MAC table of a model, an ONNX file or a compile output directory.
* :func:`load_compiled` — rebuild a compiled torch model from ``model.pt``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from .compile_report import CompileReport
from .config import DEFAULT_ARCH, SEARCH_METHODS, CompileConfig, resolve_config, validate  # noqa: F401
from .errors import ModelLoadError, RelucompError
from .infra import PassManager
from .passes.insert_gates import gates_of
from .passes.shape_prop import layer_table
from .pipelines import analyze, build_gated, check_io, lowering_passes, resolve_model, summary
from .stages import Hooks, run as run_stages
from .stages.base import HOOK_NAMES
from .stages.export import MODEL_FORMAT
from .stages.pretrain import pretrain  # noqa: F401  (library helper, used by benchmarks)
from .train import load_state

_summary = summary  # old private name, kept for callers of the previous API

__all__ = ["compile", "inspect", "inspect_onnx", "load_compiled", "CompileResult", "CompileConfig", "split_arguments"]


@dataclass
class CompileResult:
    """What :func:`compile` returns: the compiled torch model and the typed report."""

    model: fx.GraphModule
    report: CompileReport
    onnx_path: Path | None = None
    out_dir: Path | None = None
    config: CompileConfig | None = None

    @property
    def relus(self) -> int:
        return self.report.relus_after


def split_arguments(model: Any, data: Any, overrides: dict[str, Any]) -> tuple[Hooks, dict[str, Any]]:
    """Separate Python objects and callbacks (hooks) from configuration overrides."""
    from .data import DataBundle

    overrides = dict(overrides)
    hooks = Hooks(**{k: overrides.pop(k) for k in HOOK_NAMES if k in overrides})
    if hooks.leaf_modules and all(isinstance(c, str) for c in hooks.leaf_modules):
        overrides["model.leaf_modules"], hooks.leaf_modules = list(hooks.leaf_modules), ()
    if isinstance(model, nn.Module):
        hooks.model = model
    elif model is not None:
        overrides["model.spec"] = str(model)
    if isinstance(data, DataBundle):
        hooks.data = data
    elif isinstance(data, (str, os.PathLike)):
        overrides["data.spec"] = os.fspath(data)
    elif data is not None:
        raise RelucompError(f"unsupported data object {type(data).__name__}",
                            "pass a data spec string (e.g. 'synthetic', 'utkface:PATH') or a relucomp.data.DataBundle")
    return hooks, overrides


def compile(model: nn.Module | str | None = None, data: Any = None,  # noqa: A001 - the name users expect
            config: CompileConfig | dict | str | os.PathLike | None = None, **overrides: Any) -> CompileResult:
    """Compile ``model`` to at most ``relu_budget`` ReLUs per image.

    ``model``: an ``nn.Module`` (deep-copied; yours is never modified), a
    built-in name (``resnet18``...), ``file.py:factory`` or
    ``package.module:factory``; ``None`` uses the config's (default: resnet8
    trained on the data, cached).  ``data``: a spec (``synthetic`` — the
    default —, ``utkface:PATH``, ``cifar10:PATH``, ...) or a ``DataBundle``.
    ``config``: a :class:`~relucomp.config.CompileConfig`, a nested dict or a
    TOML file; keyword ``overrides`` win over it.  Every keyword of the
    previous API keeps its name and meaning (``relu_budget``, ``granularity``,
    ``search``, ``search_epochs``, ``finetune_epochs``, ``pretrain_epochs``,
    ``fair_groups``, ``fair_method``, ``tolerance``, ``fair_phase``,
    ``prune_channels``, ``out_dir``, ``resume``, ``device``, ... — see
    :data:`relucomp.config.KEYWORDS`); ``"section.field"`` keys reach any
    config field.  Hooks (not configuration): ``leaf_modules`` (classes),
    ``search_snapshots`` / ``on_snapshot`` / ``search_state`` (budget sweeps),
    ``log``.

    Everything is validated before any data is decoded or model trained.  With
    ``out_dir`` it writes ``model.onnx`` (verified), ``model.pt``,
    ``report.json``, ``config.toml`` (replay: ``compile(config=OUT/config.toml,
    out_dir=OUT2)``) and ``splits.json``; a Ctrl-C during training leaves
    ``checkpoint.pt`` there and ``resume=True`` continues from it.
    """
    hooks, overrides = split_arguments(model, data, overrides)
    cfg = validate(resolve_config(config, overrides), warm_start=hooks.search_state is not None,
                   check_data=hooks.data is None)
    st = run_stages(cfg, hooks)
    exported = st.results.get("export")
    return CompileResult(model=st["fold"].gm, report=st["report"], out_dir=st.out, config=cfg,
                         onnx_path=exported.onnx_path if exported is not None else None)


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------

def inspect(target: str | Path | nn.Module, *, num_classes: int = 10, image_size: int = 32, checkpoint=None) -> dict[str, Any]:
    """Per-layer table of a model (name, spec, module), an ONNX file, or a compile output directory."""
    if isinstance(target, (str, Path)):
        p = Path(target)
        if str(target).endswith(".onnx"):
            return inspect_onnx(target)
        if p.is_dir() and (p / "model.onnx").is_file():  # a compile --out directory
            return inspect_onnx(p / "model.onnx")
    model, spec, _ = resolve_model(target, num_classes=num_classes, checkpoint=checkpoint)
    x = torch.randn(2, 3, image_size, image_size)
    check_io(model, x, num_classes)
    gm = analyze(model, x)
    return {"model": spec or type(model).__name__, "input": [3, image_size, image_size], "layers": layer_table(gm),
            "total": summary(gm)}


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Per-layer table of an ONNX file, counted from the graph (the one ONNX walker)."""
    from .export import read_metadata
    from .onnx_graph import walk

    path = Path(path)
    if not path.exists():
        raise RelucompError(f"ONNX file {path} does not exist", "check the path")
    try:
        counts = walk(path)
    except RelucompError:                   # readable, but the walker names what is wrong with it
        raise
    except Exception as exc:  # noqa: BLE001
        raise RelucompError(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it") from exc
    rows = [{k: r[k] for k in ("name", "kind", "shape", "relus", "relus_kept", "macs", "comparisons")}
            for r in counts["rows"]]
    total = {"relus": counts["relus"], "relus_kept": counts["relus"], "macs": counts["macs"],
             "maxpool_comparisons": counts["maxpool_comparisons"], "comparisons": counts["comparisons"],
             "comparisons_by_op": counts["comparisons_by_op"], "params": counts["params"]}
    return {"model": str(path), "layers": rows, "total": total, "metadata": read_metadata(path)}


# ---------------------------------------------------------------------------
# compiled model files
# ---------------------------------------------------------------------------

def load_compiled(path: str | Path, *, model: nn.Module | None = None, gate_form: str | None = None) -> fx.GraphModule:
    """Rebuild the compiled torch model from ``model.pt`` (or its directory).

    The file holds the gated model's weights and masks plus the recipe; the
    graph is rebuilt by replaying the (deterministic) passes.  For a model
    that was passed as an object, pass the same architecture as ``model``.
    ``gate_form`` overrides the recorded lowering ("pi", "edge", "sparse", "mask";
    :mod:`relucomp.export_targets` lowers for each export target this way).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    state = load_state(path)
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise ModelLoadError(f"{path} is not a relucomp compiled model", "pass the model.pt written by relucomp compile")
    info = state["info"]
    if model is None:
        if info.get("spec") is None:
            raise ModelLoadError(f"{path} was compiled from a Python object", "pass model=<same architecture>")
        from .models import load_model

        model = load_model(info["spec"], num_classes=info["num_classes"])
    size = info.get("image_size", 32)
    example = torch.randn(2, 3, size, size)
    gm, _ = build_gated(model, example, granularity=info["granularity"], replacement=info.get("replacement", "identity"))
    if info.get("replace_maxpool"):
        from .passes.maxpool_to_avgpool import replace_maxpool as _replace_maxpool

        gm = _replace_maxpool(gm, example)
    for m in gates_of(gm).values():
        m.hard.fill_(True)
    if info.get("pruning_plan"):  # channel-pruned: slice the rebuilt graph the same way first
        from .pruning import apply_plan

        apply_plan(gm, info["pruning_plan"])
    if info.get("dp_compat"):  # the DP finetune folded BatchNorm (relucomp.dp): rebuild the same structure
        from .dp import make_dp_compatible

        gm, _ = make_dp_compatible(gm, example)
    gm.load_state_dict(state["state_dict"])
    gm.eval()
    form = gate_form or info.get("gate_form", "sparse")
    return PassManager(lowering_passes(example, gate_form=form), calibration=example).run(gm).gm

"""The library API.  The CLI is a thin layer over these keyword-only functions.

* :func:`compile` — trace → gates → search to the ReLU budget → finetune →
  lower/fold → verified ONNX export → report.
* :func:`inspect` — per-layer ReLU / MAC table of a model or an ONNX file.
* :func:`load_compiled` — rebuild a compiled torch model from ``model.pt``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

from . import __version__
from .budget import check_relu_budget, parse_count
from .errors import ModelLoadError, RelucompError
from .infra import PassManager
from .ir import trace
from .loaders import BatchLoader, first_batch
from .passes.canonicalize import CanonicalizeReLUPass
from .passes.compose_affine import ComposeAffinePass
from .passes.dce import DeadCodeEliminationPass
from .passes.finetune import FinetunePass
from .passes.fold_bn import FoldBatchNormPass
from .passes.insert_gates import InsertGatesPass, gates_of
from .passes.layer_drop import LayerDropSearchPass
from .passes.lower_gates import LowerGatesPass
from .passes.shape_prop import ShapeAnalysisPass, layer_table
from .passes.snl_search import SNLSearchPass, binarize_to_budget, hard_count, soft_count
from .train import Checkpointer, evaluate, load_state, make_optimizer, progress_bar, train_loop, ce_kd_step

DEFAULT_ARCH = "resnet8"
SEARCH_METHODS = ("snl", "layer-drop")
MODEL_FORMAT = "relucomp-compiled-v1"


def cache_root() -> Path:
    return Path(os.environ.get("RELUCOMP_CACHE", Path.home() / ".cache" / "relucomp"))


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

@dataclass
class CompileResult:
    """What :func:`compile` returns: the compiled torch model and the report."""

    model: fx.GraphModule
    report: dict[str, Any]
    onnx_path: Path | None = None
    out_dir: Path | None = None

    @property
    def relus(self) -> int:
        return int(self.report["relus"]["after"])


class _Phases:
    """Wall time per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


# ---------------------------------------------------------------------------
# model / data resolution
# ---------------------------------------------------------------------------

def _resolve_data(data, *, target, fair_groups, seed, limit, image_size, cache_dir):
    from .data import DataBundle, load_data

    if data is None:
        data = "synthetic"
    if isinstance(data, DataBundle):
        return data
    if isinstance(data, str):
        return load_data(data, target=target, fair_groups=fair_groups, seed=seed, limit=limit,
                         image_size=image_size, cache_dir=cache_dir)
    raise RelucompError(f"unsupported data object {type(data).__name__}",
                        "pass a data spec string (e.g. 'synthetic', 'utkface:PATH') or a relucomp.data.DataBundle")


def _resolve_model(model, *, num_classes: int, checkpoint) -> tuple[nn.Module, str | None, bool]:
    """Return (module, spec or None, has_trained_weights)."""
    from .models import load_model

    if model is None:
        return load_model(DEFAULT_ARCH, num_classes=num_classes), DEFAULT_ARCH, False
    if isinstance(model, str):
        m = load_model(model, num_classes=num_classes, checkpoint=checkpoint)
        return m, model, checkpoint is not None or ":" in model
    if isinstance(model, nn.Module):
        m = copy.deepcopy(model)
        if checkpoint is not None:
            from .models import load_checkpoint

            load_checkpoint(m, checkpoint)
        return m, None, True
    raise RelucompError(f"unsupported model object {type(model).__name__}",
                        "pass an nn.Module, a built-in name like 'resnet18', or 'file.py:factory'")


def _check_io(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as exc:  # noqa: BLE001
        raise RelucompError(
            f"the model does not accept inputs of shape {tuple(x[:2].shape)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            "use a model for 3-channel images of this size, or set --image-size to what the model expects",
        ) from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise RelucompError(f"the model must return logits of shape (N, classes); it returned "
                            f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}",
                            "wrap the model so that forward returns a single logits tensor")
    if out.shape[1] != num_classes:
        raise RelucompError(f"the model outputs {out.shape[1]} classes but the data has {num_classes}",
                            "build the model with the data's number of classes (factories get num_classes=...)")


def pretrain(model: nn.Module, bundle, *, epochs: int, lr: float = 0.05, batch_size: int = 128, seed: int = 0,
             progress: bool = True, cache_key: str | None = None, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Train ``model`` on ``bundle`` (cached under the relucomp cache by ``cache_key``)."""
    path = None
    if cache_key is not None:
        path = cache_root() / "models" / f"{cache_key}.pt"
        if path.exists():
            try:
                state = load_state(path)
                model.load_state_dict(state["state_dict"])
                return model, {"cached": str(path), **state.get("info", {})}
            except (RelucompError, KeyError, RuntimeError):
                path.unlink(missing_ok=True)
    torch.manual_seed(seed)
    loader = BatchLoader(bundle.train, batch_size=batch_size, shuffle=True, augment=True, seed=seed)
    opt = make_optimizer(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * len(loader)))
    step = ce_kd_step(None)

    with progress_bar(progress) as prog:
        hist = train_loop(model.to(device), loader, epochs=epochs, optimizer=opt, step_fn=step, desc="pretrain",
                          progress=prog, after_step=lambda s: sched.step(), device=device)
    model.cpu()
    info = {"epochs": epochs, "train_acc": hist[-1]["train_acc"] if hist else None}
    if path is not None:
        Checkpointer(path).save({"state_dict": model.state_dict(), "info": info})
    return model, info


# ---------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------

def analyze(model: nn.Module | fx.GraphModule, example: torch.Tensor, *, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """Trace + canonicalize + shape analysis (verified); returns the annotated GraphModule."""
    gm = trace(model, leaf_modules=leaf_modules)
    pm = PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1])],
                     calibration=example)
    return pm.run(gm).gm


def _summary(gm: fx.GraphModule) -> dict[str, int]:
    rows = layer_table(gm)
    return {"relus": sum(r["relus"] for r in rows), "relus_kept": sum(r["relus_kept"] for r in rows),
            "macs": sum(r["macs"] for r in rows),
            "maxpool_comparisons": sum(r.get("maxpool_comparisons", 0) for r in rows),
            "params": int(sum(p.numel() for p in gm.parameters()))}


def inspect(target: str | nn.Module, *, num_classes: int = 10, image_size: int = 32, checkpoint=None) -> dict[str, Any]:
    """Per-layer ReLU / MAC table of a model (name, spec, module) or an ONNX file."""
    if isinstance(target, (str, Path)) and str(target).endswith(".onnx"):
        return inspect_onnx(target)
    model, spec, _ = _resolve_model(target, num_classes=num_classes, checkpoint=checkpoint)
    x = torch.randn(2, 3, image_size, image_size)
    _check_io(model, x, num_classes)
    gm = analyze(model, x)
    rows = layer_table(gm)
    return {"model": spec or type(model).__name__, "input": [3, image_size, image_size], "layers": rows,
            "total": _summary(gm)}


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """Per-layer table of an ONNX file, counted from the graph."""
    import math

    import onnx

    from .export import read_metadata
    from .verify import _dims, onnx_relu_count

    path = Path(path)
    if not path.exists():
        raise RelucompError(f"ONNX file {path} does not exist", "check the path")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise RelucompError(f"{path} is not a readable ONNX file ({type(exc).__name__})", "re-export it") from exc
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {vi.name: _dims(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    inits = {i.name: list(i.dims) for i in inferred.graph.initializer}
    rows = []
    for node in inferred.graph.node:
        if node.op_type == "Relu":
            d = shapes.get(node.input[0], [])
            n = math.prod(d[1:]) if d and all(isinstance(v, int) for v in d[1:]) else 0
            rows.append({"name": node.name, "kind": "relu", "shape": list(d[1:]), "relus": n, "relus_kept": n, "macs": 0})
        elif node.op_type in ("Conv", "Gemm", "MatMul"):
            out = shapes.get(node.output[0], [])
            w = inits.get(node.input[1]) or shapes.get(node.input[1]) or []
            macs = 0
            if out and all(isinstance(v, int) for v in out[1:]) and w and all(isinstance(v, int) for v in w):
                if node.op_type == "Conv":
                    macs = math.prod(out[1:]) * math.prod(w[1:])
                else:
                    trans_b = any(a.name == "transB" and a.i == 1 for a in node.attribute)
                    k = w[1] if (node.op_type == "Gemm" and trans_b) else w[0]
                    macs = math.prod(out[1:]) * k
            rows.append({"name": node.name, "kind": node.op_type.lower(), "shape": list(out[1:]), "relus": 0,
                         "relus_kept": 0, "macs": macs})
    counts = onnx_relu_count(proto)
    total = {"relus": counts["relus"], "relus_kept": counts["relus"], "macs": sum(r["macs"] for r in rows),
             "maxpool_comparisons": counts["maxpool_comparisons"],
             "params": int(sum(math.prod(v) for v in inits.values()))}
    return {"model": str(path), "layers": rows, "total": total, "metadata": read_metadata(path)}


# ---------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------

def _group_accuracy(model: nn.Module, ds, device="cpu") -> dict[str, Any]:
    loader = BatchLoader(ds, batch_size=512)
    model.eval()
    correct = torch.zeros(len(ds.group_names))
    count = torch.zeros(len(ds.group_names))
    with torch.no_grad():
        for x, y, g in loader:
            ok = (model(x.to(device)).argmax(1).cpu() == y).float()
            correct.index_add_(0, g, ok)
            count.index_add_(0, g, torch.ones_like(ok))
    return {name: (100.0 * float(c / n) if n > 0 else None) for name, c, n in zip(ds.group_names, correct, count)}


def _prepare_out(out_dir) -> Path | None:
    if out_dir is None:
        return None
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".relucomp-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RelucompError(f"cannot write to output directory {out}: {exc.strerror or exc}",
                            "choose a writable --out directory") from exc
    return out


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


def build_gated(model: nn.Module, example: torch.Tensor, *, granularity: str,
                leaf_modules: Sequence[type] = ()) -> tuple[fx.GraphModule, PassManager]:
    """Trace, canonicalize and insert open gates (each step verified)."""
    gm = trace(model, leaf_modules=leaf_modules)
    pm = PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1]),
                      InsertGatesPass(granularity)], calibration=example)
    return pm.run(gm).gm, pm


def lowering_passes(example: torch.Tensor, *, gate_form: str = "sparse", compose: str = "macs") -> list:
    if gate_form == "pi":  # PI-ready: per layer, the cheapest data-movement form around the kept ReLUs
        from .passes.pi_lowering import PILoweringPass

        return [LowerGatesPass("sparse"), FoldBatchNormPass(), PILoweringPass(), ComposeAffinePass(compose),
                DeadCodeEliminationPass(), ShapeAnalysisPass(example[:1])]
    return [LowerGatesPass(gate_form), FoldBatchNormPass(), ComposeAffinePass(compose), DeadCodeEliminationPass(),
            ShapeAnalysisPass(example[:1])]


def compile(  # noqa: A001 - the public name users expect
    model: nn.Module | str | None = None,
    data: Any = None,
    *,
    relu_budget: int | str,
    granularity: str = "pixel",
    search: str = "snl",
    search_epochs: int = 4,
    finetune_epochs: int = 4,
    pretrain_epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 0.01,
    alpha_lr: float = 0.02,
    kd_weight: float = 0.5,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    target: str | None = None,
    fair_groups: str | None = None,
    limit: int | None = None,
    image_size: int = 32,
    seed: int = 0,
    out_dir: str | Path | None = None,
    resume: bool = False,
    export: bool = True,
    gate_form: str = "pi",
    replace_maxpool: bool = False,
    leaf_modules: Sequence[type] = (),
    prune_channels: float | None = None,
    mac_budget: int | str | None = None,
    sparsity: float | None = None,
    prune_importance: str = "l1",
    fair_method: str | None = None,
    tolerance: float = 2.0,
    fair_phase: str = "finetune",
    dual_lr: float = 0.05,
    diagnose: bool = False,
    search_snapshots: Sequence[int] = (),
    on_snapshot: Callable[[int, dict], None] | None = None,
    search_state: dict | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    dp_max_grad_norm: float = 1.0,
    dp_phase: str = "finetune",
    dp_batch_size: int | None = None,
    export_weights: str | None = None,
) -> CompileResult:
    """Compile ``model`` to at most ``relu_budget`` ReLUs per image.

    ``model``: an ``nn.Module`` (deep-copied; yours is never modified), a
    built-in name (``resnet18``...), ``file.py:factory`` or
    ``package.module:factory``; ``None`` uses the default (resnet8 trained on
    the data, cached).  ``data``: a spec (``synthetic`` — the default —,
    ``utkface:PATH``, ``cifar10:PATH``, ...) or a ``DataBundle``.
    ``relu_budget``: ``15000``, ``"15k"``, ``"1.5M"`` or ``"10%"``.

    Fairness: ``fair_groups`` names the protected attribute(s) (``race``,
    ``race,gender``); ``fair_method`` is ``ceag`` (default when
    ``fair_groups`` is given: per-group excess-accuracy-gap constraints
    ``ψ_g ≤ tolerance`` points, Lagrangian with cooper multipliers), ``el``
    (equalized loss) or ``nft`` (plain finetune); ``fair_phase`` applies the
    constraints during the finetune, the mask search, or both.  The report's
    ``fairness`` section gives per-group accuracy, Δ_g, ψ_g, Ψ_PW and the
    worst-group error ratio on train/val/test for the last and EMA weights.

    With ``out_dir`` it writes ``model.onnx`` (verified), ``model.pt`` and
    ``report.json``; a Ctrl-C during training leaves ``checkpoint.pt`` there
    and ``resume=True`` continues from it.

    Budget sweeps (:mod:`relucomp.sweep`): ``search_snapshots`` /
    ``on_snapshot(budget, state_dict)`` hand out the gated model's state when
    the SNL search's soft count first reaches each larger budget;
    ``search_state`` warm-starts from such a state (the search is skipped and
    the gates are binarized to ``relu_budget``).

    Differential privacy (:mod:`relucomp.dp`): ``dp_epsilon`` runs the finetune
    under DP-SGD (opacus) to (``dp_epsilon``, ``dp_delta``)-DP w.r.t. the
    training split, clipping per-sample gradients to ``dp_max_grad_norm``;
    ``export_weights`` (``last``/``ema``, default ``ema`` under DP) picks the
    weights written to ONNX.
    """
    from .fair_compile import (FAIR_METHODS, FAIR_PHASES, FairPhase, check_groups, ema_copy, fairness_section,
                               group_train_accuracy)

    say = log or (lambda s: None)
    if search not in SEARCH_METHODS:
        raise RelucompError(f"unknown search method {search!r}", f"use one of {', '.join(SEARCH_METHODS)}")
    # under DP the default is to measure fairness only (CEAG/EL dual updates would read private data)
    fair_method = (fair_method or ("ceag" if fair_groups and dp_epsilon is None else "nft")).lower()
    if fair_method not in FAIR_METHODS:
        raise RelucompError(f"unknown fairness method {fair_method!r}", f"use one of {', '.join(FAIR_METHODS)}")
    if fair_phase not in FAIR_PHASES:
        raise RelucompError(f"unknown fairness phase {fair_phase!r}", f"use one of {', '.join(FAIR_PHASES)}")
    if tolerance < 0:
        raise RelucompError(f"tolerance {tolerance} must be ≥ 0 (accuracy points)", "give e.g. --tolerance 2")
    from . import dp as _dp

    _dp.check_dp_options(epsilon=None, export_weights=export_weights, n_train=0)
    phases = _Phases()
    if not (isinstance(relu_budget, str) and relu_budget.strip().endswith("%")):
        early = parse_count(relu_budget)  # fail fast on typos, before data and training
        if early <= 0:
            check_relu_budget(early, 1)
    out = _prepare_out(out_dir)
    torch.manual_seed(seed)

    with phases("data"):
        bundle = _resolve_data(data, target=target, fair_groups=fair_groups, seed=seed, limit=limit,
                               image_size=image_size, cache_dir=cache_dir)
    n_cls = num_classes or bundle.num_classes
    if n_cls != bundle.num_classes:
        raise RelucompError(f"--num-classes {n_cls} disagrees with the data's {bundle.num_classes} classes",
                            "drop --num-classes or pick the matching target")
    dp_opts = _dp.check_dp_options(epsilon=dp_epsilon, delta=dp_delta, max_grad_norm=dp_max_grad_norm,
                                   phase=dp_phase, export_weights=export_weights, n_train=len(bundle.train),
                                   fair_method=fair_method, sparsity=sparsity)  # before any training
    export_weights = export_weights or ("ema" if dp_opts is not None else "last")
    train_loader = BatchLoader(bundle.train, batch_size=batch_size, shuffle=True, augment=True, seed=seed)
    val_loader = BatchLoader(bundle.val, batch_size=512)
    test_loader = BatchLoader(bundle.test, batch_size=512)
    calib = first_batch(BatchLoader(bundle.val, batch_size=64), 32)
    if out is not None:
        bundle.save_splits(out / "splits.json")

    with phases("model"):
        user_model, spec, trained = _resolve_model(model, num_classes=n_cls, checkpoint=checkpoint)
        _check_io(user_model, calib, n_cls)
    with phases("trace"):  # structure only: before pretraining, so bad budgets fail fast
        gm_dense = analyze(user_model, calib, leaf_modules=leaf_modules)
    before_rows = layer_table(gm_dense)
    before = _summary(gm_dense)
    if before["relus"] == 0:
        raise RelucompError("the model has no ReLUs that relucomp can see",
                            "relucomp gates ReLUs; models using other activations are not supported yet")
    budget = check_relu_budget(parse_count(relu_budget, total=before["relus"]), before["relus"])
    if prune_channels is not None or mac_budget is not None or sparsity is not None:
        from .pruning import check_options as check_pruning_options

        check_pruning_options(gm_dense, prune_channels=prune_channels, mac_budget=mac_budget, sparsity=sparsity,
                              importance=prune_importance)  # fail before any training
    say(f"model: {before['relus']:,} ReLUs, {before['macs']:,} MACs; budget {budget:,}")
    pre_info: dict[str, Any] = {}
    epochs_pre = pretrain_epochs if pretrain_epochs is not None else (0 if trained else 15)
    if epochs_pre > 0:
        with phases("pretrain"):
            key = None
            if spec is not None and not trained:
                digest = hashlib.sha1(json.dumps([spec, bundle.spec, bundle.name, bundle.summary().get("splits", {}).get("train", {}).get("n"),
                                                   n_cls, image_size, seed, epochs_pre, batch_size, bundle.target,
                                                   bundle.group_attribute], default=str).encode()).hexdigest()[:12]
                key = f"{spec.replace('/', '_').replace(':', '_')}-{bundle.name}-{digest}"
            say(f"pretraining {spec or 'model'} for {epochs_pre} epochs" + (" (cached)" if key else ""))
            user_model, pre_info = pretrain(user_model, bundle, epochs=epochs_pre, lr=0.05, batch_size=batch_size,
                                            seed=seed, progress=progress, cache_key=key, device=device)
    teacher = copy.deepcopy(user_model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


    with phases("evaluate_dense"):
        dense_val = evaluate(teacher, val_loader)
        dense_test = evaluate(teacher, test_loader)
        dense_groups = _group_accuracy(teacher, bundle.test)
        constrained = fair_method != "nft"
        if constrained:
            check_groups(bundle)
        dense_train_groups, dense_train_acc = group_train_accuracy(teacher, bundle.train)

    def fair_phase_for(phase_name: str, model_for_ema) -> FairPhase:
        use = fair_method if (fair_phase == "both" or fair_phase == phase_name) else "nft"
        return FairPhase(method=use, num_groups=bundle.num_groups, dense_group_acc=dense_train_groups,
                         dense_acc=dense_train_acc, tolerance=tolerance, dual_lr=dual_lr, ema_model=model_for_ema)

    with phases("gates"):
        gm, _ = build_gated(user_model, calib, granularity=granularity, leaf_modules=leaf_modules)
        if replace_maxpool:  # MaxPool comparisons cost like ReLUs in PI; the finetune recovers
            from .passes.maxpool_to_avgpool import replace_maxpool as _replace_maxpool

            gm = _replace_maxpool(gm, calib)

    ckpt = Checkpointer(out / "checkpoint.pt" if out is not None else None)
    state = ckpt.load() if resume else None
    if resume and out is None:
        raise RelucompError("--resume needs --out (the checkpoint lives there)", "pass the same --out as before")
    if resume and state is None:
        say("no checkpoint found; starting fresh")
    search_stats: dict[str, Any] = {}
    ft_stats: dict[str, Any] = {}
    with progress_bar(progress) as prog:
        with phases("search"):
            if state is not None and state.get("phase") == "finetune":
                if state.get("pruning_plan"):  # the checkpoint holds the pruned (smaller) weights
                    from .pruning import apply_plan

                    apply_plan(gm, state["pruning_plan"])
                gm.load_state_dict(state["model"])
                search_stats = dict(state.get("search_stats", {}))
            elif search_state is not None:  # warm start (budget sweep): binarize a searched state
                gm.load_state_dict(search_state)
                soft0 = soft_count(gates_of(gm).values())
                search_stats = {"warm_start": True, "budget": budget, "total_relus": before["relus"],
                                "soft_relus_at_start": soft0,
                                "hard_relus": binarize_to_budget(gates_of(gm), budget)}
            elif search == "snl":
                sfair = fair_phase_for("search", None) if fair_phase in ("search", "both") and constrained else None
                sp = SNLSearchPass(budget=budget, train_loader=train_loader, teacher=teacher, epochs=search_epochs,
                                   lr=lr, alpha_lr=alpha_lr, kd_weight=kd_weight, progress=prog,
                                   extra_loss=sfair.extra_loss if sfair else None,
                                   after_step=sfair.after_step if sfair else None,
                                   checkpoint=ckpt.save if out is not None else None,
                                   resume=state if state is not None and state.get("phase") == "search" else None,
                                   device=device, snapshots=search_snapshots, on_snapshot=on_snapshot)
                search_stats = PassManager([sp]).run(gm).stats["passes"][0]["stats"]
                if sfair is not None:
                    search_stats["fair_trajectory"] = sfair.trajectory
            else:
                sp = LayerDropSearchPass(budget=budget, calib_loader=val_loader, device=device)
                search_stats = PassManager([sp]).run(gm).stats["passes"][0]["stats"]
            if hard_count(gates_of(gm).values()) > budget:  # defensive: never above budget
                raise RuntimeError("search produced more ReLUs than the budget")
        light_search = {k: v for k, v in search_stats.items() if k not in ("history", "lambda_trace")}
        # [pruning hook] channel pruning / GMP runs here, on the gated graph, before finetuning
        pruning, gmp = None, None
        if prune_channels is not None or mac_budget is not None or sparsity is not None:
            from .pruning import chain_steps, compile_hook, pruning_plan_of

            with phases("prune"):
                pruning, gmp = compile_hook(
                    gm, prune_channels=prune_channels, mac_budget=mac_budget, sparsity=sparsity,
                    importance=prune_importance, calib=train_loader, relu_budget=budget,
                    finetune_steps=max(0, finetune_epochs) * len(train_loader), log=say,
                    resume_plan=state.get("pruning_plan") if state is not None and state.get("phase") == "finetune" else None)
        pruning_plan = pruning_plan_of(pruning) if pruning is not None else None
        with phases("finetune"):
            ffair, dp_result = None, None
            if dp_opts is not None:  # DP-SGD (relucomp.dp): BN folded, per-sample clipping, noise, EMA
                dp_result = _dp.dp_finetune(gm, bundle.train, dp_opts, calib=calib, teacher=teacher,
                                            epochs=finetune_epochs, batch_size=dp_batch_size or max(batch_size, 256),
                                            lr=lr * 0.5, kd_weight=kd_weight, seed=seed, progress=prog, log=say,
                                            device=device)
                gm = dp_result.model
                ft_stats = {"history": dp_result.report["history"]}
            else:
                resume_ft = state if state is not None and state.get("phase") == "finetune" else None
                ffair = fair_phase_for("finetune", gm)
                if resume_ft is not None and resume_ft.get("fair") is not None:
                    ffair.load_state_dict(resume_ft["fair"])

                def save_ft(s):
                    s["search_stats"] = light_search
                    s["pruning_plan"] = pruning_plan
                    s["fair"] = ffair.state_dict()
                    ckpt.save(s)

                def ft_epoch_end(epoch, rec):
                    return {"multipliers": ffair.term.multiplier_values(), "psi_replay": ffair.term.psi_estimate()}

                fp = FinetunePass(train_loader=train_loader, teacher=teacher, epochs=finetune_epochs, lr=lr * 0.5,
                                  kd_weight=kd_weight, progress=prog, checkpoint=save_ft if out is not None else None,
                                  extra_loss=ffair.extra_loss, on_epoch_end=ft_epoch_end,
                                  after_step=chain_steps(gmp, ffair.after_step) if gmp is not None else ffair.after_step,
                                  resume=resume_ft, device=device)
                ft_stats = PassManager([fp]).run(gm).stats["passes"][0]["stats"]
    gm.cpu().eval()
    if gmp is not None:  # GMP: reach the final sparsity and bake the masks into the weights
        pruning["sparsity"] = gmp.bake()
    gated_state = {k: v.clone() for k, v in gm.state_dict().items()}
    gm_ema = ema_copy(gm, ffair) if finetune_epochs > 0 and ffair is not None else None
    if dp_result is not None:
        gm_ema = dp_result.ema
        if export_weights == "ema" and gm_ema is not None:  # model.pt holds the exported (averaged) weights
            gated_state = {k: v.clone() for k, v in gm_ema.state_dict().items()}
    if gmp is not None and gm_ema is not None:
        gmp.apply_to(gm_ema)

    with phases("fold"):
        pm = PassManager(lowering_passes(calib, gate_form=gate_form), calibration=calib)
        gm = pm.run(gm).gm
        fold_records = [r.to_dict() for r in pm.records]
        if gm_ema is not None:
            gm_ema = PassManager(lowering_passes(calib, gate_form=gate_form), calibration=calib).run(gm_ema.eval()).gm
    after_rows = layer_table(gm)
    after = _summary(gm)
    if after["relus_kept"] > budget:
        raise RuntimeError(f"compiled model keeps {after['relus_kept']} ReLUs > budget {budget}")

    with phases("evaluate_compiled"):
        comp_val = evaluate(gm, val_loader)
        comp_test = evaluate(gm, test_loader)
        comp_groups = _group_accuracy(gm, bundle.test)
    with phases("fairness"):
        variants = {"last": gm, **({"ema": gm_ema} if gm_ema is not None else {})}
        fairness = fairness_section(teacher, variants, bundle, seed=seed)
        fairness_info = {"method": fair_method, "phase": fair_phase, "tolerance": tolerance,
                         "groups": bundle.group_names, "group_attribute": bundle.group_attribute,
                         "dense_train_group_acc": dense_train_groups, "dense_train_acc": dense_train_acc,
                         "multiplier_trajectory": ffair.trajectory if ffair is not None else [],
                         "search_multiplier_trajectory": search_stats.get("fair_trajectory", []),
                         "results": fairness}
    diagnostics = None
    if diagnose:
        with phases("diagnose"):
            from .diagnostics import diagnose as _diagnose

            def trainable(m: nn.Module) -> nn.Module:  # a copy whose weights take gradients
                m = copy.deepcopy(m)
                for p in m.parameters():
                    p.requires_grad_(True)
                for gate in gates_of(m).values():
                    gate.alpha.requires_grad_(False)
                return m

            diag_ds = bundle.val
            diagnostics = {name: _diagnose(trainable(m), BatchLoader(diag_ds, batch_size=256), bundle.num_groups,
                                           bundle.group_names)
                           for name, m in (("dense", teacher), ("compiled", gm))}

    kept_by_site = {r["name"]: r["relus_kept"] for r in after_rows if r["kind"] in ("relu", "gate", "sparse_relu")}
    per_layer = [{"site": r["name"], "shape": r["shape"], "relus_before": r["relus"],
                  "relus_after": int(kept_by_site.get(r["name"], 0))}
                 for r in before_rows if r["kind"] == "relu"]
    report: dict[str, Any] = {
        "relucomp_version": __version__,
        "model": spec or type(user_model).__name__,
        "data": {"name": bundle.name, "spec": bundle.spec or (data if isinstance(data, str) else None),
                 "target": bundle.target, "group_attribute": bundle.group_attribute,
                 "num_classes": n_cls, "summary": bundle.summary()},
        "options": {"relu_budget": budget, "granularity": granularity, "search": search,
                    "search_epochs": search_epochs, "finetune_epochs": finetune_epochs,
                    "pretrain_epochs": epochs_pre, "batch_size": batch_size, "lr": lr, "seed": seed,
                    "gate_form": gate_form, "replace_maxpool": replace_maxpool},
        "pretrain": pre_info,
        "relus": {"before": before["relus"], "after": after["relus_kept"], "budget": budget},
        "macs": {"before": before["macs"], "after": after["macs"]},
        "params": {"before": before["params"], "after": after["params"]},
        "maxpool_comparisons": {"before": before["maxpool_comparisons"], "after": after["maxpool_comparisons"]},
        "per_layer": per_layer,
        "accuracy": {"before": {"val": dense_val["acc"], "test": dense_test["acc"]},
                     "after": {"val": comp_val["acc"], "test": comp_test["acc"]}},
        "group_accuracy": {"groups": bundle.group_names, "before": dense_groups, "after": comp_groups,
                           "test_counts": bundle.test.group_counts()},
        "fairness": fairness_info,
        "diagnostics": diagnostics,
        "search": light_search,
        "search_history": search_stats.get("history", []),
        "lambda_trace": search_stats.get("lambda_trace", []),
        "finetune_history": ft_stats.get("history", []),
        "passes": fold_records,
        "pruning": pruning,
        "dp": dp_result.report if dp_result is not None else None,
        "export_weights": export_weights,
        "phases_seconds": phases.seconds,
    }
    onnx_path = None
    if out is not None:
        with phases("export"):
            _save_compiled(out / "model.pt", gated_state, spec=spec, num_classes=n_cls, granularity=granularity,
                           image_size=image_size, gate_form=gate_form, budget=budget, pruning_plan=pruning_plan,
                           replace_maxpool=replace_maxpool, dp_compat=dp_result is not None)
            if export:
                from .export import export_onnx

                meta = {"relu_count": after["relus_kept"], "relu_budget": budget, "architecture": spec or type(user_model).__name__,
                        "granularity": granularity, "dataset": bundle.name, "num_classes": n_cls,
                        "input_shape": [3, image_size, image_size], "group_attribute": bundle.group_attribute,
                        "accuracy_test": round(comp_test["acc"], 3),
                        "fair_groups": bundle.group_names, "fair_method": fair_method, "tolerance_eps": tolerance,
                        "test_max_psi": fairness["last"]["test"].get("max_psi")}
                exported = gm
                if export_weights == "ema" and gm_ema is not None:
                    exported = gm_ema
                    meta["accuracy_test"] = round(evaluate(gm_ema, test_loader)["acc"], 3)
                    meta["test_max_psi"] = fairness["ema"]["test"].get("max_psi")
                meta["export_weights"] = export_weights if exported is gm_ema else "last"
                if dp_result is not None:
                    meta.update(_dp.metadata(dp_result.report, meta["export_weights"]))
                calib_v = first_batch(test_loader, 7)
                report["export"] = export_onnx(exported, out / "model.onnx", example=calib[:1], verify_batch=calib_v,
                                               metadata=meta, max_relus=budget)
                onnx_path = out / "model.onnx"
        report["phases_seconds"] = phases.seconds
        _atomic_json(out / "report.json", report)
        ckpt.clear()
    return CompileResult(model=gm, report=report, onnx_path=onnx_path, out_dir=out)


# ---------------------------------------------------------------------------
# compiled model files
# ---------------------------------------------------------------------------

def _save_compiled(path: Path, gated_state: dict, **info) -> None:
    Checkpointer(path).save({"format": MODEL_FORMAT, "state_dict": gated_state,
                             "info": {k: v for k, v in info.items()}})


def load_compiled(path: str | Path, *, model: nn.Module | None = None) -> fx.GraphModule:
    """Rebuild the compiled torch model from ``model.pt`` (or its directory).

    The file holds the gated model's weights and masks plus the recipe; the
    graph is rebuilt by replaying the (deterministic) passes.  For a model
    that was passed as an object, pass the same architecture as ``model``.
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
    gm, _ = build_gated(model, example, granularity=info["granularity"])
    if info.get("replace_maxpool"):
        from .passes.maxpool_to_avgpool import replace_maxpool as _replace_maxpool

        gm = _replace_maxpool(gm, example)
    for m in gates_of(gm).values():
        m.hard.fill_(True)
    if info.get("pruning_plan"):  # channel-pruned: slice the rebuilt graph the same way first
        from .pruning import apply_plan

        apply_plan(gm, info["pruning_plan"])
    if info.get("dp_compat"):  # DP finetune folded BN (relucomp.dp): rebuild the same structure
        from .dp import make_dp_compatible

        gm, _ = make_dp_compatible(gm, example)
    gm.load_state_dict(state["state_dict"])
    gm.eval()
    return PassManager(lowering_passes(example, gate_form=info.get("gate_form", "sparse")), calibration=example).run(gm).gm

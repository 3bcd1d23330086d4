"""ReLU-budget sweeps: compile one model at several budgets for a trade-off report.

:func:`sweep` runs **one** SNL mask search descending through the budgets
(largest first, down to the smallest) and snapshots the gated model's state
when the soft ReLU count first reaches each budget
(``SNLSearchPass(snapshots=..., on_snapshot=...)``).  Every budget (and every
``fair_method``) is then a warm-started :func:`relucomp.api.compile`: load the
snapshot, binarize to the budget, finetune, lower/fold, export, report.  So a
sweep costs one search plus N finetunes instead of N searches.

Layout of ``out_dir``::

    sweep.json                       options, progress (resumable)
    search/                          the search run (report.json, snapshots/<budget>.pt)
    runs/<budget>[-<method>]/        report.json, model.onnx, model.pt per run

The mask search is shared by all fairness methods when the constraints act on
the finetune only (``fair_phase="finetune"``, the default); with
``fair_phase="search"``/``"both"`` each method gets its own search.  An
interrupted sweep continues where it stopped when run again with the same
options (done runs are skipped; a run interrupted mid-finetune resumes from
its checkpoint); different options raise a clear error.
"""

from __future__ import annotations

import inspect as _inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .budget import parse_count
from .errors import BudgetError, RelucompError
from .train import Interrupted

SWEEP_FORMAT = "relucomp-sweep-v1"
SHARED = "shared"

__all__ = ["SweepResult", "sweep", "parse_budgets", "load_sweep", "SWEEP_FORMAT"]


@dataclass
class SweepResult:
    """What :func:`sweep` returns: one entry per (budget, method) run."""

    out_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def reports(self) -> list[dict[str, Any]]:
        return [json.loads((self.out_dir / r["dir"] / "report.json").read_text()) for r in self.runs]


def parse_budgets(text: str | Sequence[int | str], *, total: int | None = None) -> list[int]:
    """``"5k,10k,15k"`` → ``[15000, 10000, 5000]`` (unique, largest first)."""
    items = [t.strip() for t in text.split(",")] if isinstance(text, str) else list(text)
    items = [t for t in items if not (isinstance(t, str) and not t)]
    if not items:
        raise BudgetError("no ReLU budgets given", "give a comma-separated list, e.g. --budgets 5k,10k,20k")
    out = sorted({parse_count(t, total=total) for t in items}, reverse=True)
    if out[-1] <= 0:
        raise BudgetError(f"ReLU budget {out[-1]} must be positive", "give budgets > 0")
    return out


def _needs_total(text) -> bool:
    return any("%" in str(t) for t in (text.split(",") if isinstance(text, str) else text))


def _model_relus(model, image_size: int) -> int:
    from .api import DEFAULT_ARCH, _summary, analyze
    from .models import load_model

    m = model if isinstance(model, nn.Module) else load_model(model or DEFAULT_ARCH, num_classes=10)
    return _summary(analyze(m, torch.randn(2, 3, image_size, image_size)))["relus"]


def load_sweep(out_dir: str | Path) -> dict[str, Any] | None:
    p = Path(out_dir) / "sweep.json"
    if not p.exists():
        return None
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise RelucompError(f"{p} is not valid JSON ({exc.msg})", "delete it to start the sweep over") from exc
    if state.get("format") != SWEEP_FORMAT:
        raise RelucompError(f"{p} is not a relucomp sweep file", "use another --out directory")
    return state


def _write_state(out: Path, state: dict) -> None:
    from .api import _atomic_json

    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _atomic_json(out / "sweep.json", state)


def run_name(budget: int, method: str | None) -> str:
    return f"{budget}" if method is None else f"{budget}-{method}"


def _supports_fair_method() -> bool:
    from . import api

    return "fair_method" in _inspect.signature(api.compile).parameters


def sweep(
    model: nn.Module | str | None = None,
    data: Any = "synthetic",
    *,
    budgets: str | Sequence[int | str],
    out_dir: str | Path,
    fair_methods: Sequence[str] | None = None,
    fair_groups: str | None = None,
    target: str | None = None,
    tolerance: float = 2.0,
    fair_phase: str = "finetune",
    search: str = "snl",
    granularity: str = "pixel",
    search_epochs: int = 4,
    finetune_epochs: int = 4,
    pretrain_epochs: int | None = None,
    checkpoint: str | Path | None = None,
    batch_size: int = 128,
    lr: float = 0.01,
    limit: int | None = None,
    image_size: int = 32,
    seed: int = 0,
    export: bool = True,
    keep_snapshots: bool = False,
    progress: bool = True,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
    **compile_kwargs: Any,
) -> SweepResult:
    """Compile ``model`` at every budget of ``budgets`` (and every fairness method).

    ``budgets``: ``"5k,10k,15k"`` or a list (``%`` of the model's ReLUs works
    too).  ``fair_methods``: e.g. ``["nft", "ceag"]``; ``None`` uses
    :func:`~relucomp.api.compile`'s default and names runs ``runs/<budget>``,
    otherwise ``runs/<budget>-<method>``.  Other arguments as in
    :func:`relucomp.api.compile` (extra keywords are passed through).
    Re-running with the same ``out_dir`` and options continues an interrupted
    sweep; different options raise :class:`~relucomp.errors.RelucompError`.
    """
    from . import api

    say = log or (lambda s: None)
    if search not in api.SEARCH_METHODS:
        raise RelucompError(f"unknown search method {search!r}", f"use one of {', '.join(api.SEARCH_METHODS)}")
    try:
        total = _model_relus(model, image_size)
    except Exception:  # noqa: BLE001 - compile() reports model problems with their fix
        if _needs_total(budgets):
            raise
        total = None
    budget_list = parse_budgets(budgets, total=total)
    if total is not None:
        from .budget import check_relu_budget

        for b in budget_list:
            check_relu_budget(b, total)
    out = api._prepare_out(out_dir)
    assert out is not None

    # -- fairness methods ------------------------------------------------------
    methods: list[str | None]
    if fair_methods:
        methods = []
        for m in fair_methods:
            m = str(m).strip().lower()
            if m and m not in methods:
                methods.append(m)
        if not _supports_fair_method():
            dropped = [m for m in methods if m != "nft"]
            if dropped:
                say(f"this relucomp's compile() has no fair_method option: {', '.join(dropped)} not available, "
                    "running plain finetuning (nft) only")
            methods = ["nft"]
            fair_kw: dict[str, Any] = {}
        else:
            fair_kw = {"tolerance": tolerance, "fair_phase": fair_phase}
    else:
        methods = [None]
        fair_kw = {"tolerance": tolerance, "fair_phase": fair_phase} if _supports_fair_method() else {}
    explicit_methods = bool(fair_methods)

    # -- options / resume --------------------------------------------------------
    if isinstance(model, nn.Module):
        model_id = f"<{type(model).__name__} object>"
    else:
        model_id = model or api.DEFAULT_ARCH
    data_id = data if isinstance(data, str) or data is None else f"<{type(data).__name__} {getattr(data, 'spec', '')}>"
    options = {
        "model": model_id, "data": data_id or "synthetic", "budgets": budget_list,
        "methods": [m for m in methods] if explicit_methods else None, "fair_groups": fair_groups,
        "target": target, "tolerance": tolerance if fair_kw else None, "fair_phase": fair_phase if fair_kw else None,
        "search": search, "granularity": granularity, "search_epochs": search_epochs,
        "finetune_epochs": finetune_epochs, "pretrain_epochs": pretrain_epochs,
        "checkpoint": str(checkpoint) if checkpoint is not None else None, "batch_size": batch_size, "lr": lr,
        "limit": limit, "image_size": image_size, "seed": seed, "export": export,
        "extra": {k: v for k, v in sorted(compile_kwargs.items())},
    }
    options = json.loads(json.dumps(options, default=str))
    state = load_sweep(out)
    if state is not None:
        old = state.get("options", {})
        diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
        if diff:
            detail = "; ".join(f"{k}: {old.get(k)!r} → {options.get(k)!r}" for k in diff[:4])
            raise RelucompError(f"{out} holds a sweep with other options ({detail})",
                                "run the same command as before to continue it, or choose a new --out directory")
        say(f"continuing the sweep in {out}")
    else:
        state = {"format": SWEEP_FORMAT, "options": options, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "searches": {}, "runs": {}, "complete": False}
    _write_state(out, state)

    shared_search = search == "snl" and (fair_phase == "finetune" or not fair_kw or methods == [None])

    def search_key(method: str | None) -> str:
        return SHARED if shared_search else (method or "default")

    def compile_common(method: str | None) -> dict[str, Any]:
        kw = dict(granularity=granularity, search=search, search_epochs=search_epochs,
                  finetune_epochs=finetune_epochs, pretrain_epochs=pretrain_epochs, checkpoint=checkpoint,
                  batch_size=batch_size, lr=lr, target=target, fair_groups=fair_groups, limit=limit,
                  image_size=image_size, seed=seed, progress=progress, device=device, log=log, **fair_kw,
                  **compile_kwargs)
        if method is not None and "fair_method" in _inspect.signature(api.compile).parameters:
            kw["fair_method"] = method
        return kw

    def snap_dir(key: str) -> Path:
        return out / ("search" if key == SHARED else f"search-{key}") / "snapshots"

    def is_done(name: str) -> bool:
        r = state["runs"].get(name)
        return bool(r and r.get("status") == "done" and (out / r["dir"] / "report.json").exists())

    # -- the search(es) ------------------------------------------------------------
    result = SweepResult(out_dir=out, state=state)
    todo = [(b, m) for b in budget_list for m in methods if not is_done(run_name(b, m if explicit_methods else None))]
    if search == "snl":
        for key in dict.fromkeys(search_key(m) for _, m in todo):
            sdir = snap_dir(key)
            need = sorted({b for b, m in todo if search_key(m) == key}, reverse=True)
            if all((sdir / f"{b}.pt").exists() for b in need):
                continue
            sdir.mkdir(parents=True, exist_ok=True)
            method = None if key == SHARED else key
            kw = compile_common(method)
            if key == SHARED and fair_kw and "fair_method" in _inspect.signature(api.compile).parameters:
                kw["fair_method"] = "nft"  # the shared search is unconstrained (constraints act in the finetune)
            kw["finetune_epochs"] = 0

            def on_snapshot(b: int, sd: dict, sdir: Path = sdir) -> None:
                path = sdir / f"{b}.pt"
                if not path.exists():
                    tmp = path.with_suffix(".pt.tmp")
                    torch.save(sd, tmp)
                    os.replace(tmp, path)
                    say(f"search: snapshot for budget {b:,}")

            search_dir = sdir.parent
            resume = (search_dir / "checkpoint.pt").exists()
            say(f"searching ReLU masks once for budgets {', '.join(f'{b:,}' for b in budget_list)}"
                + (" (resuming)" if resume else ""))
            t0 = time.perf_counter()
            try:
                res = api.compile(model, data, relu_budget=budget_list[-1], out_dir=search_dir, export=False,
                                  resume=resume, search_snapshots=budget_list, on_snapshot=on_snapshot, **kw)
            except Interrupted as exc:
                raise Interrupted(f"sweep interrupted during the mask search ({exc.cause})",
                                  "run the same sweep command again to continue") from None
            state["searches"][key] = {"dir": str(search_dir.relative_to(out)), "seconds": round(time.perf_counter() - t0, 2),
                                      "snapshots": res.report.get("search", {}).get("snapshots", {}),
                                      "total_relus": res.report["relus"]["before"]}
            _write_state(out, state)

    # -- one warm-started compile per (budget, method) ----------------------------------
    for b in budget_list:
        for m in methods:
            name = run_name(b, m if explicit_methods else None)
            rdir = out / "runs" / name
            entry = {"name": name, "budget": b, "method": m, "dir": str(rdir.relative_to(out))}
            if is_done(name):
                result.skipped.append(name)
                result.runs.append({**entry, **state["runs"][name]})
                say(f"{name}: done already, skipped")
                continue
            kw = compile_common(m)
            warm = None
            if search == "snl":
                snap = snap_dir(search_key(m)) / f"{b}.pt"
                warm = torch.load(snap, map_location="cpu", weights_only=True)
            say(f"compiling at {b:,} ReLUs" + (f" ({m})" if m else ""))
            t0 = time.perf_counter()
            state["runs"][name] = {"status": "running", "dir": entry["dir"], "budget": b, "method": m}
            _write_state(out, state)
            try:
                res = api.compile(model, data, relu_budget=b, out_dir=rdir, export=export,
                                  resume=(rdir / "checkpoint.pt").exists(), search_state=warm, **kw)
            except Interrupted as exc:
                raise Interrupted(f"sweep interrupted at budget {b:,} ({exc.cause})",
                                  "run the same sweep command again to continue (done budgets are skipped)") from None
            rep = res.report
            fair = rep.get("fairness") or {}
            rep["sweep"] = {"budget": b, "method": fair.get("method", m or "nft"), "name": name,
                            "shared_search": search == "snl",
                            "snapshot": state["searches"].get(search_key(m), {}).get("snapshots", {}).get(str(b)),
                            "sweep_dir": ".."}
            api._atomic_json(rdir / "report.json", rep)
            last = ((fair.get("results") or {}).get("last") or {}).get("test") or {}
            state["runs"][name] = {"status": "done", "dir": entry["dir"], "budget": b,
                                   "method": rep["sweep"]["method"], "relus": rep["relus"]["after"],
                                   "acc_test": rep["accuracy"]["after"]["test"],
                                   "group_acc_test": rep["group_accuracy"]["after"],
                                   "max_psi": last.get("max_psi"),
                                   "seconds": round(time.perf_counter() - t0, 2)}
            _write_state(out, state)
            result.runs.append({**entry, **state["runs"][name]})

    state["complete"] = True
    _write_state(out, state)
    if not keep_snapshots:
        for key in list(state["searches"]) or [SHARED]:
            d = snap_dir(key)
            if d.exists():
                shutil.rmtree(d)
    return result

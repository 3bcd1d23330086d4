"""ReLU-budget sweeps: compile one model at several budgets for a trade-off report.

:func:`sweep` runs **one** SNL mask search descending through the budgets
(largest first, down to the smallest) and snapshots the gated model's state
when the soft ReLU count first reaches each budget
(``SNLSearchPass(snapshots=..., on_snapshot=...)``).  Every budget (and every
``fair_method``) is then a warm-started :func:`relucomp.api.compile`: load the
snapshot, binarize to the budget, finetune, lower/fold, export, report.  So a
sweep costs one search plus N finetunes instead of N searches.  Every run is
the same stage pipeline as ``compile`` on the same :class:`~relucomp.config.CompileConfig`
(the sweep's base config with the budget / method / warm start applied).

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

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .atomic import atomic_torch_save, atomic_write_json
from .budget import parse_count
from .compile_report import CompileReport
from .config import DEFAULT_ARCH, CompileConfig, resolve_config, validate
from .errors import BudgetError, Interrupted, RelucompError

SWEEP_FORMAT = "relucomp-sweep-v2"
SHARED = "shared"

__all__ = ["SweepResult", "sweep", "parse_budgets", "load_sweep", "SWEEP_FORMAT"]


@dataclass
class SweepResult:
    """What :func:`sweep` returns: one entry per (budget, method) run."""

    out_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def reports(self) -> list[CompileReport]:
        return [CompileReport.from_dict(json.loads((self.out_dir / r["dir"] / "report.json").read_text()))
                for r in self.runs]


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
    from .models import load_model
    from .pipelines import analyze, summary

    m = model if isinstance(model, nn.Module) else load_model(model or DEFAULT_ARCH, num_classes=10)
    return summary(analyze(m, torch.randn(2, 3, image_size, image_size)))["relus"]


def load_sweep(out_dir: str | Path) -> dict[str, Any] | None:
    p = Path(out_dir) / "sweep.json"
    if not p.exists():
        return None
    try:
        state = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise RelucompError(f"{p} is not valid JSON ({exc.msg})", "delete it to start the sweep over") from exc
    if not str(state.get("format", "")).startswith("relucomp-sweep-v"):
        raise RelucompError(f"{p} is not a relucomp sweep file", "use another --out directory")
    return state


def _write_state(out: Path, state: dict) -> None:
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    atomic_write_json(out / "sweep.json", state)


def run_name(budget: int, method: str | None) -> str:
    return f"{budget}" if method is None else f"{budget}-{method}"


def _options(cfg: CompileConfig, model, data, budgets: list[int], methods) -> dict[str, Any]:
    """What must match for a sweep directory to be continued: the config (less per-run fields) and the runs."""
    flat = {f"{sec}.{k}": v for sec, vals in cfg.model_dump().items() for k, v in vals.items()}
    for k in ("search.relu_budget", "runtime.out_dir", "runtime.resume", "runtime.progress", "model.spec", "data.spec"):
        flat.pop(k, None)
    model_id = f"<{type(model).__name__} object>" if isinstance(model, nn.Module) else (model or cfg.model.spec or DEFAULT_ARCH)
    data_id = data if isinstance(data, str) or data is None else f"<{type(data).__name__} {getattr(data, 'spec', '')}>"
    return json.loads(json.dumps({"model": model_id, "data": data_id or cfg.data.spec, "budgets": budgets,
                                  "methods": methods, **flat}, default=str))


def sweep(
    model: nn.Module | str | None = None,
    data: Any = "synthetic",
    *,
    budgets: str | Sequence[int | str],
    out_dir: str | Path,
    fair_methods: Sequence[str] | None = None,
    config: CompileConfig | dict | str | None = None,
    keep_snapshots: bool = False,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> SweepResult:
    """Compile ``model`` at every budget of ``budgets`` (and every fairness method).

    ``budgets``: ``"5k,10k,15k"`` or a list (``%`` of the model's ReLUs works
    too).  ``fair_methods``: e.g. ``["nft", "ceag"]``; ``None`` uses the
    config's method and names runs ``runs/<budget>``, otherwise
    ``runs/<budget>-<method>``.  ``config`` and keyword ``overrides`` as in
    :func:`relucomp.compile` (the same config type and stages).  Re-running
    with the same ``out_dir`` and options continues an interrupted sweep;
    different options raise :class:`~relucomp.errors.RelucompError`.
    """
    from . import api

    say = log or (lambda s: None)
    base = resolve_config(config, {k: v for k, v in overrides.items()})
    methods: list[str | None] = list(dict.fromkeys(str(m).strip().lower() for m in fair_methods if str(m).strip())) \
        if fair_methods else [None]
    explicit = bool(fair_methods)
    for m in methods:
        validate(base.with_values({"search.relu_budget": 1, "fairness.method": m}), check_data=not hasattr(data, "splits"))
    try:
        total = _model_relus(model, base.data.image_size)
    except Exception:  # noqa: BLE001 - compile() reports model problems with their fix
        if _needs_total(budgets):
            raise
        total = None
    budget_list = parse_budgets(budgets, total=total)
    if total is not None:
        from .budget import check_relu_budget

        for b in budget_list:
            check_relu_budget(b, total)
    from .stages import prepare_out

    out, _ = prepare_out(out_dir)
    options = _options(base, model, data, budget_list, methods if explicit else None)
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

    shared_search = base.search.method == "snl" and (base.fairness.phase == "finetune" or methods == [None])

    def search_key(method: str | None) -> str:
        return SHARED if shared_search else (method or "default")

    def snap_dir(key: str) -> Path:
        return out / ("search" if key == SHARED else f"search-{key}") / "snapshots"

    def is_done(name: str) -> bool:
        r = state["runs"].get(name)
        return bool(r and r.get("status") == "done" and (out / r["dir"] / "report.json").exists())

    def run_compile(**kw) -> Any:
        if kw.get("fair_method") is None:
            kw.pop("fair_method", None)
        return api.compile(model, data, config=base, log=log, **kw)

    # -- the search(es) ------------------------------------------------------------
    result = SweepResult(out_dir=out, state=state)
    todo = [(b, m) for b in budget_list for m in methods if not is_done(run_name(b, m if explicit else None))]
    if base.search.method == "snl":
        for key in dict.fromkeys(search_key(m) for _, m in todo):
            sdir = snap_dir(key)
            need = sorted({b for b, m in todo if search_key(m) == key}, reverse=True)
            if all((sdir / f"{b}.pt").exists() for b in need):
                continue
            sdir.mkdir(parents=True, exist_ok=True)

            def on_snapshot(b: int, sd: dict, sdir: Path = sdir) -> None:
                path = sdir / f"{b}.pt"
                if not path.exists():
                    atomic_torch_save(path, sd)
                    say(f"search: snapshot for budget {b:,}")

            search_dir = sdir.parent
            resume = (search_dir / "checkpoint.pt").exists()
            say(f"searching ReLU masks once for budgets {', '.join(f'{b:,}' for b in budget_list)}"
                + (" (resuming)" if resume else ""))
            t0 = time.perf_counter()
            # the shared search is unconstrained (constraints act in the finetune)
            method = "nft" if key == SHARED and explicit else (None if key == SHARED else key)
            try:
                res = run_compile(relu_budget=budget_list[-1], out_dir=search_dir, export=False, resume=resume,
                                  finetune_epochs=0, fair_method=method, search_snapshots=budget_list,
                                  on_snapshot=on_snapshot)
            except Interrupted as exc:
                raise Interrupted(f"sweep interrupted during the mask search ({exc.cause})",
                                  "run the same sweep command again to continue") from None
            rep = res.report if isinstance(res.report, CompileReport) else CompileReport.from_dict(res.report)
            state["searches"][key] = {"dir": str(search_dir.relative_to(out)), "seconds": round(time.perf_counter() - t0, 2),
                                      "snapshots": rep.search.get("snapshots", {}), "total_relus": rep.relus_before}
            _write_state(out, state)

    # -- one warm-started compile per (budget, method) ----------------------------------
    for b in budget_list:
        for m in methods:
            name = run_name(b, m if explicit else None)
            rdir = out / "runs" / name
            entry = {"name": name, "budget": b, "method": m, "dir": str(rdir.relative_to(out))}
            if is_done(name):
                result.skipped.append(name)
                result.runs.append({**entry, **state["runs"][name]})
                say(f"{name}: done already, skipped")
                continue
            warm = None
            if base.search.method == "snl":
                warm = torch.load(snap_dir(search_key(m)) / f"{b}.pt", map_location="cpu", weights_only=True)
            say(f"compiling at {b:,} ReLUs" + (f" ({m})" if m else ""))
            t0 = time.perf_counter()
            state["runs"][name] = {"status": "running", "dir": entry["dir"], "budget": b, "method": m}
            _write_state(out, state)
            try:
                res = run_compile(relu_budget=b, out_dir=rdir, resume=(rdir / "checkpoint.pt").exists(),
                                  search_state=warm, fair_method=m)
            except Interrupted as exc:
                raise Interrupted(f"sweep interrupted at budget {b:,} ({exc.cause})",
                                  "run the same sweep command again to continue (done budgets are skipped)") from None
            rep = res.report if isinstance(res.report, CompileReport) else CompileReport.from_dict(res.report)
            rep.sweep = {"budget": b, "method": (rep.fairness or {}).get("method", m or "nft"), "name": name,
                         "shared_search": base.search.method == "snl",
                         "snapshot": state["searches"].get(search_key(m), {}).get("snapshots", {}).get(str(b)),
                         "sweep_dir": ".."}
            atomic_write_json(rdir / "report.json", rep.to_dict())
            state["runs"][name] = {"status": "done", "dir": entry["dir"], "budget": b, "method": rep.sweep["method"],
                                   "relus": rep.relus_after, "acc_test": rep.test_accuracy[1],
                                   "group_acc_test": rep.group_accuracy["after"], "max_psi": rep.max_psi,
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

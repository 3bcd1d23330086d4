"""A self-contained HTML report of a budget sweep (or of one compile run).

:func:`render_report` reads ``DIR/sweep.json`` + ``DIR/runs/*/report.json``
(from :func:`relucomp.sweep.sweep`) or a single ``DIR/report.json`` (from
``relucomp compile``) and writes ``DIR/report.html`` with its figures in
``DIR/figures/*.png`` (matplotlib, Agg backend), referenced by relative path
or embedded as base64 (``inline=True``):

* group accuracy vs ReLU budget (one line per group, test-set group sizes in
  the legend, overall accuracy dashed, the dense model at its full ReLU count),
* excess accuracy gap ψ_g per group and fairness method at one budget (with the
  report's bootstrap CIs when present),
* max ψ_g and the overall accuracy drop vs budget,
* ReLUs kept per layer (absolute and % of the dense layer) per budget,
* private-inference latency vs budget (measured when a run's report holds a
  measurement, otherwise estimated),

* with differentially private runs (``report.json["dp"]``; several compile
  directories side by side, or a sweep under ``--dp-epsilon``): test accuracy
  and max ψ_g vs ε for the last and the averaged (EMA) weights, non-private
  runs as reference lines, and the privacy accounting per run,

and the numbers behind every figure in tables.  A directory that holds
several compile output directories (``DIR/*/report.json``) is read like a
sweep.  ψ_g comes from the report's
``fairness`` section (:func:`relucomp.metrics.fairness_report`, test split,
last weights) when present, else it is computed from the report's group
accuracies: ``ψ_g = (acc_dense(g) − acc(g)) − (acc_dense − acc)``.
"""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .budget import human, parse_count
from .compile_report import CompileReport
from .errors import RelucompError

__all__ = ["RunData", "ReportData", "collect", "render_report", "pi_latency", "LATENCY_FLOOR_S", "LATENCY_PER_RELU_S"]

LATENCY_FLOOR_S = 0.29      # linear layers of a small CIFAR ResNet, 2PC on loopback (see docs reference)
LATENCY_PER_RELU_S = 16e-6  # ≈15–18 µs per ReLU (SPU Cheetah, 2 cores, loopback)
FALLBACK_LABEL = "estimated, 16 µs/ReLU"


# --------------------------------------------------------------------------- PI latency

def _measured_latency(rep: dict[str, Any] | None, run_dir: Path | None = None) -> float | None:
    """A measured 2PC latency: ``report["pi"]["measured"]`` or ``run_dir/pi_bench.json`` (``relucomp pi-bench``)."""
    cands: list[Any] = []
    if rep is not None:
        for key in ("pi", "pi_bench", "pi_latency"):
            sec = rep.get(key)
            if isinstance(sec, dict):
                cands.append(sec.get("measured", sec if key == "pi_bench" else None))
    if run_dir is not None and (run_dir / "pi_bench.json").exists():
        try:
            cands.append(json.loads((run_dir / "pi_bench.json").read_text()))
        except (OSError, ValueError):
            pass
    for c in cands:
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return float(c)
        if isinstance(c, dict):
            for k in ("latency_s", "seconds", "median_s"):
                if isinstance(c.get(k), (int, float)):
                    return float(c[k])
    return None


def _report_costs(rep: dict[str, Any] | None, relus: int) -> dict[str, Any]:
    """What a 2PC runtime pays for, from a compile report (no ONNX needed).

    Gathered elements follow the sparse lowering (:class:`relucomp.nn.SparseReLU`):
    a partially linearized layer of ``b`` elements gathers the kept and the
    linear elements (``b``) and gathers the result back into place (``b``).
    """
    if rep is None:
        return {"relus": int(relus), "maxpool_comparisons": 0, "macs": 0, "gather_elements": 0}
    dense = int(relus) >= int(rep.get("relus", {}).get("before", -1))
    side = "before" if dense else "after"
    gathered = 0
    if not dense:
        for p in rep.get("per_layer") or []:
            b, a = int(p.get("relus_before", 0)), int(p.get("relus_after", 0))
            if 0 < a < b:
                gathered += 2 * b
    return {"relus": int(relus), "maxpool_comparisons": int((rep.get("maxpool_comparisons") or {}).get(side, 0)),
            "macs": int((rep.get("macs") or {}).get(side, 0)), "gather_elements": gathered}


def _cost_model_latency(relus: int, rep: dict[str, Any] | None, onnx: Path | None) -> tuple[float, str] | None:
    """Latency from ``relucomp.pi.estimate`` (the ``relucomp estimate`` cost model), when installed."""
    try:
        from .pi.estimate import load_cost_model, onnx_costs, predict
    except Exception:  # noqa: BLE001 - optional component
        return None
    try:
        costs = None
        if onnx is not None and onnx.exists():
            try:
                costs = onnx_costs(onnx)
            except Exception:  # noqa: BLE001 - fall back to the report's counts
                costs = None
        if costs is None:
            costs = _report_costs(rep, relus)
        model = load_cost_model()
        s = float(predict(costs, model)["latency_s"])
    except Exception:  # noqa: BLE001 - an incompatible cost model: use the fallback
        return None
    if not math.isfinite(s):
        return None
    src = str(model.get("source", "fitted cost_model.json"))
    return s, "estimated (relucomp.pi cost model" + (", built-in defaults)" if "default" in src else ")")


def pi_latency(relus: int, rep: dict[str, Any] | None = None, *, run_dir: Path | None = None,
               onnx: Path | None = None) -> tuple[float, str]:
    """``(seconds per image, label)``: measured when a measurement is stored with the run,
    else the ``relucomp.pi`` cost model, else ``0.29 s + 16 µs × ReLUs``."""
    m = _measured_latency(rep, run_dir)
    if m is not None:
        return m, "measured (2PC)"
    cm = _cost_model_latency(relus, rep, onnx)
    if cm is not None:
        return cm
    return LATENCY_FLOOR_S + LATENCY_PER_RELU_S * relus, FALLBACK_LABEL


# --------------------------------------------------------------------------- data

@dataclass
class RunData:
    name: str
    dir: Path
    budget: int
    method: str
    relus_total: int
    relus: int
    acc_dense: float
    acc: float
    groups: list[str]
    counts: dict[str, int]
    group_dense: dict[str, float | None]
    group_acc: dict[str, float | None]
    psi: dict[str, float | None]
    psi_ci: dict[str, list[float] | None]
    max_psi: float | None
    psi_pw: float | None
    fairness_source: str
    tolerance: float | None
    per_layer: list[dict[str, Any]]
    latency_s: float
    latency_label: str
    latency_dense_s: float
    latency_dense_label: str
    onnx: Path | None
    seconds: float
    report: dict[str, Any] = field(repr=False, default_factory=dict)
    dp: dict[str, Any] | None = None            # the report's ``dp`` section (DP-SGD finetune)
    ema_acc: float | None = None                # test accuracy / max ψ_g of the averaged weights
    ema_max_psi: float | None = None


@dataclass
class ReportData:
    root: Path
    kind: str  # "sweep" | "compile"
    runs: list[RunData]
    sweep: dict[str, Any] | None = None

    @property
    def budgets(self) -> list[int]:
        return sorted({r.budget for r in self.runs}, reverse=True)

    @property
    def methods(self) -> list[str]:
        order = [str(m) for m in ((self.sweep or {}).get("options") or {}).get("methods") or []]
        present = list(dict.fromkeys(r.method for r in self.runs))
        return [m for m in order if m in present] + [m for m in present if m not in order]

    @property
    def groups(self) -> list[str]:
        return self.runs[0].groups if self.runs else []


def _fnum(v: Any) -> float | None:
    if v is None:
        return None
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _eps_label(dp: dict[str, Any]) -> str:
    eps = _fnum(dp.get("epsilon_target"))
    return "∞" if eps is None or not dp.get("private", True) else f"{eps:g}"


def run_from_report(rep: dict[str, Any], run_dir: Path, name: str | None = None) -> RunData:
    try:
        budget = int(rep["relus"]["budget"])
        ga = rep["group_accuracy"]
        acc_d, acc_c = float(rep["accuracy"]["before"]["test"]), float(rep["accuracy"]["after"]["test"])
    except (KeyError, TypeError) as exc:
        raise RelucompError(f"{run_dir / 'report.json'} is not a relucomp compile report (missing {exc})",
                            "point relucomp report at a sweep or compile output directory") from exc
    groups = list(ga.get("groups") or list(ga.get("before", {})))
    counts = {g: int((ga.get("test_counts") or {}).get(g, 0)) for g in groups}
    gd = {g: _fnum(ga["before"].get(g)) for g in groups}
    gc = {g: _fnum(ga["after"].get(g)) for g in groups}
    fair = rep.get("fairness") or {}
    tolerance = _fnum(fair.get("tolerance")) if fair.get("method") in ("ceag",) else None
    method = (rep.get("sweep") or {}).get("method") or fair.get("method") or "nft"
    dp = rep.get("dp") or None
    dp = dp.to_dict() if hasattr(dp, "to_dict") else dp  # a typed DPReport (or the dict of an older reader)
    if dp:  # runs that differ only in ε must stay apart in every table and figure
        method = f"{method} · DP ε={_eps_label(dp)}"
    fr = None
    res = fair.get("results") if isinstance(fair, dict) else None
    ema = None
    if isinstance(res, dict):
        fr = ((res.get("last") or {}).get("test")) if "last" in res else None
        ema = (res.get("ema") or {}).get("test")
    elif isinstance(fair, dict) and "groups" in fair and "psi_pw" in fair:  # a bare fairness_report
        fr = fair
    psi: dict[str, float | None] = {}
    psi_ci: dict[str, list[float] | None] = {g: None for g in groups}
    if fr and isinstance(fr.get("groups"), dict):
        for g in groups:
            psi[g] = _fnum((fr["groups"].get(g) or {}).get("psi"))
        ci = fr.get("ci") or {}
        for g in groups:
            v = ((ci.get("groups") or {}).get(g) or {}).get("psi")
            psi_ci[g] = [float(v[0]), float(v[1])] if v and None not in v else None
        max_psi, psi_pw, source = _fnum(fr.get("max_psi")), _fnum(fr.get("psi_pw")), "fairness report (test, last weights)"
    else:
        delta = acc_d - acc_c
        for g in groups:
            psi[g] = None if gd[g] is None or gc[g] is None or not counts.get(g, 1) else (gd[g] - gc[g]) - delta
        vals = [v for v in psi.values() if v is not None]
        max_psi = max(vals) if vals else None
        psi_pw = (max(vals) - min(vals)) if vals else None
        source = "computed from group accuracies (test)"
    relus = int(rep["relus"]["after"])
    total = int(rep["relus"]["before"])
    onnx = run_dir / "model.onnx"
    lat, lab = pi_latency(relus, rep, run_dir=run_dir, onnx=onnx)
    dense_rep = {k: rep.get(k) for k in ("relus", "macs", "maxpool_comparisons")}
    lat_d, lab_d = pi_latency(total, dense_rep)
    return RunData(
        name=name or run_dir.name, dir=run_dir, budget=budget, method=str(method), relus_total=total, relus=relus,
        acc_dense=acc_d, acc=acc_c, groups=groups, counts=counts, group_dense=gd, group_acc=gc, psi=psi,
        psi_ci=psi_ci, max_psi=max_psi, psi_pw=psi_pw, fairness_source=source, tolerance=tolerance,
        per_layer=list(rep.get("per_layer") or []), latency_s=lat, latency_label=lab, latency_dense_s=lat_d, latency_dense_label=lab_d,
        onnx=onnx if onnx.exists() else None, seconds=float(sum((rep.get("phases_seconds") or {}).values())),
        report=rep, dp=dict(dp) if dp else None, ema_acc=_fnum(((ema or {}).get("overall") or {}).get("acc_compiled")),
        ema_max_psi=_fnum((ema or {}).get("max_psi")),
    )


def _read_report(path: Path) -> CompileReport:
    """A run's report.json, read through the typed report."""
    try:
        return CompileReport.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise RelucompError(f"{path} is not a relucomp compile report ({type(exc).__name__})",
                            "point relucomp report at a sweep or compile output directory") from exc


def collect(path: str | Path) -> ReportData:
    """Read a sweep directory (``sweep.json``/``runs/*``) or a compile directory (``report.json``)."""
    root = Path(path)
    if root.is_file() and root.name.endswith(".json"):
        root = root.parent
    if not root.is_dir():
        raise RelucompError(f"{root} is not a directory", "give the --out directory of relucomp sweep or compile")
    if (root / "report.json").exists() and not (root / "runs").is_dir():
        rep = _read_report(root / "report.json")
        return ReportData(root=root, kind="compile", runs=[run_from_report(rep, root, name=root.name)])
    sweep_state = None
    if (root / "sweep.json").exists():
        from .sweep import load_sweep

        sweep_state = load_sweep(root)
    runs: list[RunData] = []
    if sweep_state is not None:
        dirs = [(name, root / r["dir"]) for name, r in sweep_state.get("runs", {}).items() if r.get("status") == "done"]
    else:  # DIR/runs/* (a sweep without sweep.json), else DIR/* (several compile directories side by side)
        base = root / "runs" if (root / "runs").is_dir() else root
        dirs = [(d.name, d) for d in sorted(base.glob("*")) if d.is_dir()]
    for name, d in dirs:
        rp = d / "report.json"
        if rp.exists():
            runs.append(run_from_report(_read_report(rp), d, name=name))
    if not runs:
        raise RelucompError(f"no finished runs under {root}",
                            "run `relucomp sweep ... --out DIR` (or `relucomp compile --out DIR`) first")
    data = ReportData(root=root, kind="sweep", runs=runs, sweep=sweep_state)
    order = {m: i for i, m in enumerate(data.methods)}
    runs.sort(key=lambda r: (-r.budget, order.get(r.method, len(order))))
    return data


# --------------------------------------------------------------------------- figures

_METHOD_STYLE = ["-", "--", ":", "-."]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def _budget_axis(ax, xs: Sequence[int]) -> None:
    ax.set_xscale("log")
    ticks = sorted(set(xs))
    ax.set_xticks(ticks)
    ax.set_xticklabels([human(t) for t in ticks], rotation=0)
    ax.minorticks_off()


def fig_group_accuracy(data: ReportData, path: Path) -> Path:
    plt = _plt()
    methods = data.methods
    fig, axes = plt.subplots(1, len(methods), figsize=(6.4 * len(methods), 4.6), squeeze=False, sharey=True)
    cols = _colors(len(data.groups))
    for ax, method in zip(axes[0], methods):
        runs = sorted([r for r in data.runs if r.method == method], key=lambda r: r.relus)
        total = runs[0].relus_total
        xs = [r.relus for r in runs] + [total]
        for g, c in zip(data.groups, cols):
            ys = [r.group_acc.get(g) for r in runs] + [runs[0].group_dense.get(g)]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=c, lw=2, ms=5,
                    label=f"{g} (n={runs[0].counts.get(g, 0)})")
        ax.plot(xs, [r.acc for r in runs] + [runs[0].acc_dense], "--s", color="black", lw=1.8, ms=4,
                label=f"overall (n={sum(runs[0].counts.values())})")
        ax.axvline(total, color="grey", ls=":", lw=1)
        _budget_axis(ax, xs)
        ax.set_xticklabels([human(t) + ("\n(dense)" if t == total else "") for t in sorted(set(xs))])
        ax.set_xlabel("ReLUs kept per image (log)")
        ax.set_title("test accuracy per group vs ReLU budget" + (f" — {method}" if len(methods) > 1 else ""))
        ax.legend(title=data.runs[0].report.get("data", {}).get("group_attribute") or "group", fontsize=8,
                  loc="best")
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fig_psi(data: ReportData, budget: int, path: Path) -> Path:
    plt = _plt()
    runs = [r for r in data.runs if r.budget == budget]
    methods = [m for m in data.methods if any(r.method == m for r in runs)]
    groups = data.groups
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(methods)) + 2), 4.2))
    width = 0.8 / max(1, len(methods))
    cols = _colors(len(methods))
    for i, m in enumerate(methods):
        r = next(r for r in runs if r.method == m)
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        vals = [r.psi.get(g) if r.psi.get(g) is not None else 0.0 for g in groups]
        err = None
        if all(r.psi_ci.get(g) for g in groups):
            err = [[max(0.0, v - r.psi_ci[g][0]) for g, v in zip(groups, vals)],
                   [max(0.0, r.psi_ci[g][1] - v) for g, v in zip(groups, vals)]]
        bars = ax.bar(xs, vals, width * 0.92, color=cols[i], label=m, yerr=err, capsize=3,
                      error_kw={"elinewidth": 1, "alpha": 0.7})
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:+.2f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom" if v >= 0 else "top", fontsize=8, xytext=(0, 2 if v >= 0 else -2),
                        textcoords="offset points")
        if r.tolerance is not None:
            ax.axhline(r.tolerance, color=cols[i], ls="--", lw=1, alpha=0.8)
            ax.annotate(f"ε = {r.tolerance:g} ({m})", (0.01, r.tolerance), xycoords=("axes fraction", "data"),
                        ha="left", va="bottom", fontsize=8, color=cols[i])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={runs[0].counts.get(g, 0)})" for g in groups])
    ax.set_ylabel("ψ_g = Δ_g − Δ (accuracy points)")
    ax.set_title(f"excess accuracy gap per group at {budget:,} ReLUs (test)")
    ax.legend(title="method", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fig_max_psi(data: ReportData, path: Path) -> Path:
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    cols = _colors(len(data.methods))
    xs_all = []
    for m, c in zip(data.methods, cols):
        runs = sorted([r for r in data.runs if r.method == m], key=lambda r: r.relus)
        xs = [r.relus for r in runs] + [runs[0].relus_total]  # the dense model: no loss, no gap
        xs_all += xs
        nan = float("nan")
        a1.plot(xs, [r.acc_dense - r.acc for r in runs] + [0.0], "-o", color=c, label=m)
        a2.plot(xs, [r.max_psi if r.max_psi is not None else nan for r in runs] + [0.0], "-o", color=c,
                label=f"{m}: max ψ_g")
        a2.plot(xs, [r.psi_pw if r.psi_pw is not None else nan for r in runs] + [0.0], ":^", color=c,
                label=f"{m}: Ψ_PW")
    for ax, title, yl in ((a1, "overall accuracy lost vs budget", "Δ = acc_dense − acc (points)"),
                          (a2, "disparity vs budget", "points")):
        _budget_axis(ax, xs_all)
        ax.set_xlabel("ReLUs kept per image (log)")
        ax.set_title(title)
        ax.set_ylabel(yl)
        ax.axhline(0, color="black", lw=0.8)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _pick_budgets(budgets: Sequence[int], k: int = 6) -> list[int]:
    b = sorted(budgets, reverse=True)
    if len(b) <= k:
        return b
    idx = sorted({round(i * (len(b) - 1) / (k - 1)) for i in range(k)})
    return [b[i] for i in idx]


def _layer_runs(data: ReportData) -> list[RunData]:
    m0 = data.methods[0]
    return [next(r for r in data.runs if r.budget == b and r.method == m0)
            for b in _pick_budgets([r.budget for r in data.runs if r.method == m0])]


def fig_layers(data: ReportData, path: Path) -> Path:
    plt = _plt()
    runs = _layer_runs(data)
    layers = [p["site"] for p in runs[0].per_layer]
    dense = [p["relus_before"] for p in runs[0].per_layer]
    n = len(runs) + 1
    width = 0.85 / n
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(layers) + 3), 7.5), sharex=True)
    cols = _colors(len(runs))
    xs0 = list(range(len(layers)))
    a1.bar([x - 0.425 + width / 2 for x in xs0], dense, width * 0.92, color="#bbbbbb", label="dense (before)")
    for i, r in enumerate(runs):
        kept = {p["site"]: p["relus_after"] for p in r.per_layer}
        ys = [kept.get(l, 0) for l in layers]
        off = -0.425 + width * (i + 1.5)
        a1.bar([x + off for x in xs0], ys, width * 0.92, color=cols[i], label=f"{r.budget:,} ReLUs")
        a2.bar([x + off for x in xs0], [100.0 * y / d if d else 0 for y, d in zip(ys, dense)], width * 0.92,
               color=cols[i], label=f"{r.budget:,} ReLUs")
    a1.set_yscale("log")
    a1.set_ylabel("ReLUs (log)")
    a1.set_title("ReLUs per layer: dense vs kept after compilation" + (f" ({runs[0].method})" if len(data.methods) > 1 else ""))
    a1.legend(fontsize=8, ncol=min(4, n))
    a2.set_ylabel("% of the layer's ReLUs kept")
    a2.set_xticks(xs0)
    a2.set_xticklabels(layers, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fig_latency(data: ReportData, path: Path) -> Path:
    plt = _plt()
    m0 = data.methods[0]
    runs = sorted([r for r in data.runs if r.method == m0], key=lambda r: r.relus)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = sorted({r.latency_label for r in runs})
    xs = [r.relus for r in runs]
    ys = [r.latency_s for r in runs]
    ax.plot(xs, ys, "-o", color="tab:blue", label="compiled: " + " / ".join(labels))
    if not math.isnan(runs[0].latency_dense_s):
        ax.plot([runs[0].relus_total], [runs[0].latency_dense_s], "s", color="tab:red",
                label=f"dense ({runs[0].relus_total:,} ReLUs)")
        xs = xs + [runs[0].relus_total]
    for x, y in zip([r.relus for r in runs], ys):
        ax.annotate(f"{y:.2f}s", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _budget_axis(ax, xs)
    ax.set_xlabel("ReLUs per image (log)")
    ax.set_ylabel("PI latency per image (s)")
    ax.set_ylim(bottom=0)
    ax.set_title("private-inference latency vs ReLU budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _dp_x(runs: Sequence[RunData]) -> tuple[dict[str, float], float | None]:
    """x position per DP run (ε target; ε = ∞ placed right of the largest finite ε) and that position."""
    finite = [_fnum(r.dp.get("epsilon_target")) for r in runs if _eps_label(r.dp) != "∞"]
    inf_x = max([f for f in finite if f] or [1.0]) * 3.0
    return {r.name: (inf_x if _eps_label(r.dp) == "∞" else float(r.dp["epsilon_target"])) for r in runs}, \
        (inf_x if any(_eps_label(r.dp) == "∞" for r in runs) else None)


def fig_dp(data: ReportData, path: Path) -> Path:
    """Test accuracy and max ψ_g vs ε (last and EMA weights), one colour per budget; non-private runs dashed."""
    plt = _plt()
    dp_runs = [r for r in data.runs if r.dp]
    xpos, inf_x = _dp_x(dp_runs)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({r.budget for r in dp_runs}, reverse=True)
    for b, c in zip(budgets, _colors(len(budgets))):
        runs = sorted([r for r in dp_runs if r.budget == b], key=lambda r: xpos[r.name])
        xs = [xpos[r.name] for r in runs]
        tag = f" ({b:,} ReLUs)" if len(budgets) > 1 else ""
        nan = float("nan")
        for ax, last, ema in ((a1, [r.acc for r in runs], [r.ema_acc for r in runs]),
                              (a2, [r.max_psi for r in runs], [r.ema_max_psi for r in runs])):
            ax.plot(xs, [nan if v is None else v for v in last], "-o", color=c, label="last" + tag)
            if any(v is not None for v in ema):
                ax.plot(xs, [nan if v is None else v for v in ema], "--s", color=c, alpha=0.75, label="EMA" + tag)
        for r in (r for r in data.runs if not r.dp and r.budget == b):
            a1.axhline(r.acc, color=c, ls=":", lw=1.2, label=f"non-private {r.method}" + tag)
            if r.max_psi is not None:
                a2.axhline(r.max_psi, color=c, ls=":", lw=1.2, label=f"non-private {r.method}" + tag)
    ticks = sorted(set(xpos.values()))
    for ax, title, yl in ((a1, "test accuracy vs ε", "test accuracy (%)"),
                          (a2, "max ψ_g vs ε (test)", "max ψ_g (points)")):
        ax.set_xscale("log")
        ax.set_xticks(ticks)
        ax.set_xticklabels(["∞" if t == inf_x else f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("ε (privacy budget of the finetune; log)")
        ax.set_title(title)
        ax.set_ylabel(yl)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def dp_table(data: ReportData) -> dict[str, Any] | None:
    """The privacy accounting and the last / EMA results of every DP run (``None`` without DP runs)."""
    dp_runs = [r for r in data.runs if r.dp]
    if not dp_runs:
        return None
    xpos, _ = _dp_x(dp_runs)
    rows = []
    for r in sorted(dp_runs, key=lambda r: (-r.budget, xpos[r.name])):
        d = r.dp
        spent = _fnum(d.get("epsilon_spent"))
        rows.append([r.name, f"{r.budget:,}", _eps_label(d), "∞ (no noise)" if spent is None else _f(spent, 3),
                     f"{_fnum(d.get('delta')) or 0:.1e}", _f(_fnum(d.get("noise_multiplier")), 3),
                     _f(_fnum(d.get("max_grad_norm"))), _f(_fnum(d.get("sample_rate")), 4),
                     str(d.get("steps", "–")) + (f" (augmult {d['augmult']})" if (d.get("augmult") or 1) > 1 else ""),
                     _f(r.acc), _f(r.ema_acc), _f(r.max_psi, signed=True), _f(r.ema_max_psi, signed=True),
                     d.get("export_weights") or "–", "; ".join(d.get("conversion") or []) or "–"])
    for r in (r for r in data.runs if not r.dp):
        rows.append([r.name, f"{r.budget:,}", "non-private", "–", "–", "–", "–", "–", "–", _f(r.acc), _f(r.ema_acc),
                     _f(r.max_psi, signed=True), _f(r.ema_max_psi, signed=True), "–", "–"])
    return _table(["run", "budget", "ε target", "ε spent", "δ", "noise σ", "clip C", "sample rate q", "steps",
                   "test acc last", "test acc EMA", "max ψ_g last", "max ψ_g EMA", "exported", "DP conversion"],
                  rows, num_from=1)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:.92em} figure{margin:12px 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.88em}
table{border-collapse:collapse;margin:10px 0;font-size:.9em} th,td{border:1px solid #ddd;padding:4px 8px}
th{background:#f4f4f4;text-align:center} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa} .bad{color:#b00020;font-weight:600} .note{color:#666;font-size:.85em}
"""


def _f(v: float | None, nd: int = 2, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.{nd}f}" if signed else f"{v:.{nd}f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], num_from: int = 1, cls: str = "") -> dict[str, Any]:
    """A table for the template: cells are text (escaped by jinja2) or ``(Markup html, css class)``."""
    out = []
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            if isinstance(c, tuple):
                cells.append({"content": c[0], "cls": c[1]})
            else:
                cells.append({"content": str(c), "cls": "num" if i >= num_from else ""})
        out.append(cells)
    return {"headers": [str(h) for h in headers], "rows": out, "cls": cls}


def _img(path: Path, root: Path, alt: str, inline: bool) -> dict[str, str]:
    if inline:
        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    else:
        src = path.relative_to(root).as_posix()
    return {"src": src, "alt": alt}


def _rel(p: Path | None, root: Path):
    from markupsafe import Markup, escape

    if p is None:
        return "–"
    try:
        r = p.relative_to(root).as_posix()
    except ValueError:
        r = str(p)
    return Markup('<a href="{0}">{0}</a>').format(escape(r))


def _group_robustness_columns(data: ReportData, groups: list[str], hdr: list, rows: list) -> None:
    """Per-group NPA / AdvA columns of the per-group table (runs with a robustness section, > 1 group)."""
    secs = [r.report.get("robustness") for r in data.runs]
    if len(groups) < 2 or not any(secs):
        return
    hdr += [f"{g} {k}" for k in ("NPA", "AdvA") for g in groups]
    first = next(s for s in secs if s)
    dense = (first["models"].get("dense") or {}).get("groups", {})
    rows[0] += [_f((dense.get(g) or {}).get(k)) for k in ("npa", "adva") for g in groups]
    for row, sec in zip(rows[1:], secs):
        mg = ((sec or {}).get("models", {}).get("compiled") or {}).get("groups", {})
        row += [_f((mg.get(g) or {}).get(k)) for k in ("npa", "adva") for g in groups]


def _robustness_tables(data: ReportData) -> dict[str, Any] | None:
    """CA / NPA / AdvA vs budget and NPA per corruption, for the runs whose report has a robustness section."""
    runs = [(r, r.report.get("robustness")) for r in data.runs]
    runs = [(r, rb) for r, rb in runs if rb]
    if not runs:
        return None
    first = runs[0][1]
    corr = list(first["settings"]["corruptions"])
    rows, crows = [], []
    dense = first["models"].get("dense")
    if dense:
        rows.append(["dense", "–", f"{runs[0][0].relus_total:,}", _f(dense["ca"]), _f(dense["npa"]), _f(dense["adva"])])
        crows.append(["dense", "–"] + [_f(dense["npa_by_corruption"].get(c)) for c in corr])
    for r, rb in runs:
        m = rb["models"]["compiled"]
        rows.append([f"{r.budget:,}", r.method, f"{r.relus:,}", _f(m["ca"]), _f(m["npa"]), _f(m["adva"])])
        crows.append([f"{r.budget:,}", r.method] + [_f(m["npa_by_corruption"].get(c)) for c in corr])
    st = first["settings"]
    note = (f"{first['samples']} {st.get('split', 'test')} images (seeded subset); NPA: mean accuracy over {len(corr)} corruptions "
            f"(imagecorruptions) × severities {', '.join(map(str, st['severities']))}; AdvA: PGD L∞ "
            f"ε = {st['pgd_epsilon'] * 255:.3g}/255, step {st['pgd_step'] * 255:.3g}/255, {st['pgd_steps']} steps, "
            "random start, in pixel space.")
    rc = first.get("robust_compile")
    if rc:
        t = rc.get("teacher", {})
        note += (" Robust compile (--robust): dense = the robust teacher ("
                 + (f"{t.get('teacher_epochs')} epochs {str(t.get('train_attack')).upper()} PGD-"
                    f"{t.get('train_attack_steps')} + AugMix" if t.get("adversarial_finetune") else "given as robust")
                 + f"); dual BN, exported branch: {rc.get('exported_branch')}.")
    return {"summary": _table(["budget", "method", "ReLUs", "CA (%)", "NPA (%)", "AdvA (%)"], rows, num_from=2),
            "corruptions": _table(["budget", "method"] + corr, crows, num_from=2), "note": note}


def _environment():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("relucomp", "templates"),
                              autoescape=jinja2.select_autoescape(["html", "j2"]), keep_trailing_newline=True)


def render_report(path: str | Path, *, budget: int | str | None = None, inline: bool = False,
                  out: str | Path | None = None, title: str | None = None) -> Path:
    """Write ``report.html`` (+ ``figures/*.png``) for the sweep or compile directory ``path``.

    ``budget``: the budget of the ψ_g bars (default: the smallest).  ``inline``:
    embed the PNGs as base64 (one file to share).  ``out``: the HTML path
    (default ``path/report.html``; figures go next to it in ``figures/``).
    """
    data = collect(path)
    html_path = Path(out) if out is not None else data.root / "report.html"
    root = html_path.parent
    root.mkdir(parents=True, exist_ok=True)
    figdir = root / "figures"
    figdir.mkdir(exist_ok=True)
    budgets = data.budgets
    if budget is None:
        b_sel = budgets[-1]
    else:
        want = parse_count(budget, total=data.runs[0].relus_total)
        if want not in budgets:
            raise RelucompError(f"no run at budget {want:,} in {data.root}",
                                f"choose one of {', '.join(f'{b:,}' for b in budgets)}")
        b_sel = want
    figs = {
        "group_accuracy": fig_group_accuracy(data, figdir / "group_accuracy.png"),
        "psi": fig_psi(data, b_sel, figdir / "psi_bars.png"),
        "disparity": fig_max_psi(data, figdir / "disparity.png"),
        "layers": fig_layers(data, figdir / "relus_per_layer.png"),
        "latency": fig_latency(data, figdir / "pi_latency.png"),
    }
    dp_fig = fig_dp(data, figdir / "dp_epsilon.png") if any(r.dp for r in data.runs) else None
    r0 = data.runs[0]
    rep0 = r0.report
    groups = data.groups
    multi = len(data.methods) > 1
    dinfo = rep0.get("data", {})
    opts = rep0.get("options", {})

    ttl = title or (f"relucomp sweep — {rep0.get('model')} on {dinfo.get('name')}" if data.kind == "sweep"
                    else f"relucomp compile — {rep0.get('model')} on {dinfo.get('name')} at {r0.budget:,} ReLUs")
    from markupsafe import Markup, escape

    meta = [Markup("model <b>{}</b>").format(rep0.get('model')), f"{r0.relus_total:,} ReLUs dense",
            Markup("data <b>{}</b>").format(dinfo.get('spec') or dinfo.get('name')),
            f"target {dinfo.get('target')}", f"groups: {dinfo.get('group_attribute')}",
            f"budgets {', '.join(f'{b:,}' for b in budgets)}",
            f"method(s) {', '.join(data.methods)}",
            f"search {opts.get('search')} ({opts.get('search_epochs')} epochs), "
            f"finetune {opts.get('finetune_epochs')} epochs, granularity {opts.get('granularity')}",
            f"relucomp {rep0.get('relucomp_version')}", f"rendered {time.strftime('%Y-%m-%d %H:%M')}"]
    meta = [m if isinstance(m, Markup) else escape(m) for m in meta]

    hdr = ["budget", "method", "ReLUs kept", "test acc (%)", "Δ (points)"] + \
          [f"{g} acc (%)" for g in groups] + ["max ψ_g", "Ψ_PW", "PI latency (s)", "ONNX"]
    rows = [["dense", "–", f"{r0.relus_total:,}", _f(r0.acc_dense), _f(0.0)] +
            [_f(r0.group_dense.get(g)) for g in groups] + ["–", "–", _f(r0.latency_dense_s), "–"]]
    for r in data.runs:
        rows.append([f"{r.budget:,}", r.method, f"{r.relus:,}", _f(r.acc), _f(r.acc_dense - r.acc)] +
                    [_f(r.group_acc.get(g)) for g in groups] +
                    [_f(r.max_psi), _f(r.psi_pw), _f(r.latency_s), (_rel(r.onnx, root), "")])

    ghdr = ["budget", "method", "ReLUs kept"] + [f"{g} (n={r0.counts.get(g, 0)})" for g in groups] + ["overall"]
    grows = [["dense", "–", f"{r0.relus_total:,}"] + [_f(r0.group_dense.get(g)) for g in groups] + [_f(r0.acc_dense)]]
    for r in data.runs:
        grows.append([f"{r.budget:,}", r.method, f"{r.relus:,}"] + [_f(r.group_acc.get(g)) for g in groups] + [_f(r.acc)])
    _group_robustness_columns(data, groups, ghdr, grows)

    sel = [r for r in data.runs if r.budget == b_sel]
    phdr = ["group", "n"] + [f"ψ_g {r.method}" for r in sel] + [f"95% CI {r.method}" for r in sel]
    prow = []
    for g in groups:
        ci = []
        for r in sel:
            c = r.psi_ci.get(g)
            ci.append(f"[{c[0]:+.2f}, {c[1]:+.2f}]" if c else "–")
        prow.append([g, f"{r0.counts.get(g, 0)}"] + [_f(r.psi.get(g), signed=True) for r in sel] + ci)
    prow.append(["max ψ_g", "–"] + [_f(r.max_psi, signed=True) for r in sel] + ["" for _ in sel])
    prow.append(["Ψ_PW", "–"] + [_f(r.psi_pw) for r in sel] + ["" for _ in sel])

    drows = [[f"{r.budget:,}", r.method, _f(r.acc_dense - r.acc), _f(r.max_psi, signed=True), _f(r.psi_pw),
              next((g for g in groups if r.psi.get(g) is not None and r.psi.get(g) == r.max_psi), "–")]
             for r in data.runs]

    lruns = _layer_runs(data)
    lhdr = ["layer", "shape", "dense"] + [f"{r.budget:,}" for r in lruns]
    lrows = []
    for i, p in enumerate(lruns[0].per_layer):
        row = [p["site"], "×".join(map(str, p.get("shape", []))), f"{p['relus_before']:,}"]
        for r in lruns:
            a = r.per_layer[i]["relus_after"] if i < len(r.per_layer) else 0
            row.append(f"{a:,} ({100.0 * a / p['relus_before']:.1f}%)" if p["relus_before"] else f"{a:,}")
        lrows.append(row)
    lrows.append(["total", "", f"{r0.relus_total:,}"] + [f"{r.relus:,}" for r in lruns])

    lat_rows = [["dense", f"{r0.relus_total:,}", _f(r0.latency_dense_s), r0.latency_dense_label or "–"]]
    for r in sorted([r for r in data.runs if r.method == data.methods[0]], key=lambda r: -r.budget):
        lat_rows.append([f"{r.budget:,}", f"{r.relus:,}", _f(r.latency_s), r.latency_label])

    rrows = []
    for r in data.runs:
        ex = r.report.get("export") or {}
        rrows.append([(_rel(r.dir / "report.json", root), ""), r.method, f"{r.relus:,}", f"{r.budget:,}",
                      f"{ex.get('onnx_relus', '–'):,}" if isinstance(ex.get("onnx_relus"), int) else "–",
                      f"{ex['ort_max_abs_diff']:.1e}" if isinstance(ex.get("ort_max_abs_diff"), float) else "–",
                      _f(r.seconds, 1)])
    search_table = None
    if data.sweep and data.sweep.get("searches"):
        srows = []
        for key, s in data.sweep["searches"].items():
            for b, info in (s.get("snapshots") or {}).items():
                srows.append([key, f"{int(b):,}", f"{info.get('step')}", f"{info.get('soft_relus'):,}",
                              "yes" if info.get("reached") else "no (end of search)"])
        if srows:
            search_table = _table(["search", "budget", "step", "soft ReLUs", "reached softly"], srows, num_from=1)

    doc = _environment().get_template("report.html.j2").render(
        title=ttl, css=Markup(_CSS), meta=meta, b_sel=b_sel, multi=multi,
        figs={k: _img(v, root, alt, inline) for (k, v), alt in zip(figs.items(), (
            "group accuracy vs budget", "psi per group", "disparity vs budget", "relus per layer", "PI latency"))},
        summary=_table(hdr, rows, num_from=2), psi_source=r0.fairness_source,
        latency_labels=", ".join(sorted({r.latency_label for r in data.runs})),
        groups_table=_table(ghdr, grows, num_from=2), psi_table=_table(phdr, prow, num_from=1),
        disparity_table=_table(["budget", "method", "Δ (points)", "max ψ_g", "Ψ_PW", "worst group"], drows, num_from=2),
        layers_table=_table(lhdr, lrows, num_from=2),
        latency_table=_table(["budget", "ReLUs", "latency (s)", "source"], lat_rows, num_from=1),
        cost_model_note=any(r.latency_label.startswith("estimated (relucomp.pi") for r in data.runs),
        fallback_note=any(r.latency_label == FALLBACK_LABEL for r in data.runs), latency_floor=LATENCY_FLOOR_S,
        runs_table=_table(["report", "method", "ReLUs", "budget", "ONNX ReLUs", "ORT |diff|", "time (s)"], rrows,
                          num_from=2),
        search_table=search_table, dp_table=dp_table(data), robustness=_robustness_tables(data),
        dp_fig=_img(dp_fig, root, "accuracy and max psi vs epsilon", inline) if dp_fig is not None else None)
    from .atomic import atomic_write_text

    atomic_write_text(html_path, doc)
    return html_path

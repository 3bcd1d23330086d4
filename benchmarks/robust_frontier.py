"""The robust compile's CA / AdvA frontier (issue 12) → benchmarks/results/robust_frontier.json + docs/figures/robust_frontier.png.

No training: this reads the test-split ``bench_robust.py`` files in ``benchmarks/results/`` (the CIFAR-10 subset of
record, ``--limit 3000``, at least two seeds) and puts every configuration measured since session 12 on one plot per
budget — robust − plain CA against robust − plain AdvA (means over the seeds, sample std as error bars), NPA as the
marker's fill (filled: ≥ +3) — with RLNet's goal region (AdvA ≥ +10, CA ≥ −2, NPA ≥ +3) shaded. Per budget it fits
the least-squares line CA = a + b·AdvA over the resnet8 configurations of the current protocol (PRIME's ops, JSD 48,
dual-BN teachers: ``FAMILY`` below) and reports the line's CA at AdvA = +10 — how far the goal's corner lies off the
trade-off these configurations share — and which configurations meet the goal.

    python benchmarks/robust_frontier.py               # writes the JSON and the figure
    python benchmarks/robust_frontier.py --no-figure   # the JSON only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relucomp.atomic import atomic_write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FIGURE = ROOT / "docs" / "figures" / "robust_frontier.png"
GOAL = {"ca": -2.0, "npa": 3.0, "adva": 10.0}

#: file stem → (short label, protocol family). "current": PRIME's ops, JSD 48, dual-BN teachers (sessions 16-24);
#: "older": the protocols before it (AugMix's ops and/or JSD 12 and/or a one-BN teacher), kept for context;
#: "distilled": the second teacher distilled from the twice-wider resnet8's β 6 teacher (session 25, --distill-from).
#: Left out on purpose: robust_mt_init (robust.json reproduces it to the digit), robust_defaults_s21 (its seeds are
#: robust_intel4's first three), robust_6000 / robust_limit6000 (twice the data: another data point of the subset).
CONFIGS: dict[str, tuple[str, str]] = {
    "robust": ("defaults (two teachers, β 6 start)", "current"),
    "robust_intel4": ("defaults, second host", "current"),
    "robust_20": ("defaults at 20 %", "current"),
    "robust_mt": ("two teachers, HAT start", "current"),
    "robust_hat": ("one HAT teacher", "current"),
    "robust_soup": ("start ½ HAT + ½ β 6", "current"),
    "robust_layered": ("layer-wise start, β 6 early", "current"),
    "robust_layered_rev": ("layer-wise start, HAT early", "current"),
    "robust_tlr005": ("cleaner first teacher (lr ½)", "current"),
    "robust_searchclean": ("clean mask search", "current"),
    "robust_beta6": ("one β 6 teacher", "current"),
    "robust_w2": ("2× wider resnet8", "wide"),
    "robust_w2_10": ("2× wider resnet8", "wide"),
    "robust_distill": ("second teacher distilled from the 2× wider one", "distilled"),
    "robust_distill_hat": ("… and the student from the HAT teacher", "distilled"),
    "robust_augmix": ("one β 6 teacher, AugMix ops", "older"),
    "robust_single_bn": ("one-BN β 6 teacher, AugMix ops", "older"),
    "robust_jsd12": ("one-BN teacher, JSD 12", "older"),
    "robust_eps6": ("one-BN teacher, training ε 6/255", "older"),
}
#: the configurations the line is fitted over (resnet8, current protocol)
FAMILY = "current"


def load_points(results: Path = RESULTS) -> list[dict]:
    """One point per (file, budget): robust − plain means and sample stds over the file's seeds."""
    points = []
    for stem, (label, family) in CONFIGS.items():
        path = results / f"{stem}.json"
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        key = d.get("schedule_key", {})
        if key.get("split", "test") != "test" or key.get("limit") != 3000:
            raise SystemExit(f"{path.name}: not a test-split --limit 3000 file (split {key.get('split')}, "
                             f"limit {key.get('limit')}); fix CONFIGS in {Path(__file__).name}")
        for budget, s in d["summary"].items():
            rmp = s.get("robust_minus_plain")
            if not rmp or len(s["seeds"]) < 2:
                continue
            points.append({"file": path.name, "label": label, "family": family, "budget": budget,
                           "seeds": len(s["seeds"]),
                           **{m: rmp[m]["mean"] for m in ("ca", "npa", "adva")},
                           **{f"{m}_std": rmp[m]["std"] for m in ("ca", "npa", "adva")}})
    return points


def meets(p: dict) -> bool:
    return p["ca"] >= GOAL["ca"] and p["npa"] >= GOAL["npa"] and p["adva"] >= GOAL["adva"]


def fit_line(points: list[dict]) -> dict | None:
    """Least squares CA = a + b·AdvA; the line's CA at the goal's AdvA and the residuals' spread."""
    if len(points) < 3:
        return None
    xs = [p["adva"] for p in points]
    ys = [p["ca"] for p in points]
    b, a = statistics.linear_regression(xs, ys)
    res = [y - (a + b * x) for x, y in zip(xs, ys)]
    at_goal = a + b * GOAL["adva"]
    return {"n": len(points), "intercept": round(a, 3), "slope_ca_per_adva": round(b, 3),
            "residual_std": round(statistics.stdev(res), 2), "max_residual": round(max(res), 2),
            "ca_at_goal_adva": round(at_goal, 2), "ca_short_of_goal_at_goal_adva": round(GOAL["ca"] - at_goal, 2),
            "r": round(statistics.correlation(xs, ys), 3)}


def analyse(points: list[dict]) -> dict:
    budgets = sorted(dict.fromkeys(p["budget"] for p in points), key=lambda b: float(b.rstrip("%")))
    out = {}
    for b in budgets:
        pts = [p for p in points if p["budget"] == b]
        fam = [p for p in pts if p["family"] == FAMILY]
        out[b] = {"points": len(pts), "meet_goal": [f"{p['file']} ({p['label']})" for p in pts if meets(p)],
                  "line": fit_line(fam), "fitted_over": [p["file"] for p in fam]}
    return out


def figure(points: list[dict], analysis: dict, path: Path) -> Path:
    """One panel per budget with a fitted line; each configuration numbered, the key below the panels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    budgets = [b for b, s in analysis.items() if s["line"]]
    points = [p for p in points if p["budget"] in budgets]
    ids = {label: i + 1 for i, label in enumerate(dict.fromkeys(p["label"] for p in points))}
    colors = {"current": "tab:blue", "wide": "tab:green", "older": "tab:gray", "distilled": "tab:red"}
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.0 * len(budgets), 5.8), sharey=True, squeeze=False)
    for ax, b in zip(axes[0], budgets):
        ax.fill_between([GOAL["adva"], 16], GOAL["ca"], 2, color="tab:green", alpha=0.12, lw=0,
                        label="RLNet goal (and NPA ≥ +3)")
        for p in (p for p in points if p["budget"] == b):
            c = colors[p["family"]]
            ax.errorbar(p["adva"], p["ca"], xerr=p["adva_std"], yerr=p["ca_std"], fmt="none", ecolor=c,
                        alpha=0.2, lw=1)
            ax.plot(p["adva"], p["ca"], "o", ms=7, mec=c, mfc=c if p["npa"] >= GOAL["npa"] else "white", mew=1.5)
            i = ids[p["label"]]
            ax.annotate(str(i), (p["adva"], p["ca"]), xytext=(5, 2) if i % 2 else (-6, -11),
                        textcoords="offset points", fontsize=8, color=c)
        line = analysis[b]["line"]
        xs = [7, 16]
        ax.plot(xs, [line["intercept"] + line["slope_ca_per_adva"] * x for x in xs], "-", color="tab:blue",
                alpha=0.5, lw=1, label=f"least squares over the blue points: CA {line['ca_at_goal_adva']:+.1f} "
                                       f"at AdvA +10 (residual std {line['residual_std']})")
        ax.set_title(f"{b} of resnet8's ReLUs")
        ax.set_xlabel("robust − plain AdvA (points; PGD-10, 8/255)")
        ax.set_xlim(7, 16)
        ax.set_ylim(-7, 2)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=7)
    axes[0][0].set_ylabel("robust − plain CA (points)")
    fig.suptitle("Robust vs plain compile at the same budget: CIFAR-10 subset (2,250 train / 500 test images), mean over "
                 "2-4 seeds, bars = sample std.\nFilled: NPA ≥ +3. Blue: resnet8, current protocol; green: 2× wider "
                 "resnet8; red: second teacher distilled from the 2× wider one; grey: older protocols.", fontsize=9)
    key = [f"{i} {label}" for label, i in ids.items()]
    cols = 3
    rows = [key[i::cols] for i in range(cols)]
    fig.text(0.02, 0.01, "\n".join("  ".join(f"{c:<46}" for c in row) for row in zip(*[r + [""] * (len(rows[0]) - len(r)) for r in rows])),
             fontsize=7.5, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=RESULTS / "robust_frontier.json")
    ap.add_argument("--figure", type=Path, default=FIGURE)
    ap.add_argument("--no-figure", action="store_true")
    a = ap.parse_args(argv)
    points = load_points(a.results)
    analysis = analyse(points)
    doc = {"benchmark": "robust_frontier", "goal": GOAL,
           "note": "no measurement of its own: means over seeds from the test-split bench_robust.py files named; "
                   "machines and loads are in those files",
           "fit_family": FAMILY, "budgets": analysis, "points": points}
    atomic_write_json(a.out, doc)
    print(f"wrote {a.out}")
    for b, s in analysis.items():
        line = s["line"]
        fit = (f"line over {line['n']} configs: CA {line['ca_at_goal_adva']:+.2f} at AdvA +10 "
               f"(residual std {line['residual_std']}, r {line['r']})" if line else "no line (< 3 configs)")
        print(f"  {b}: {s['points']} points; meet the goal: {len(s['meet_goal'])}; {fit}")
    if not a.no_figure:
        print(f"wrote {figure(points, analysis, a.figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

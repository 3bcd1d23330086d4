"""Compiler-core benchmark (issue 2) → benchmarks/results/core.json.

1. Compile-pass wall times on the built-in ResNet18 (557,056 ReLUs): trace,
   canonicalize, shape analysis, gate insertion, binarization to a budget
   (random gate values; no training), lowering, BN folding, affine
   composition, DCE, ONNX export + onnxruntime verification.  Goal: < 10 s
   for all non-training passes on 2 cores.
2. Cost of a gated training step (pixel gates, SNL loss with L1 + Adam on the
   gates) relative to a plain step of the same model.  Goal: ≤ 1.3×.
3. Accuracy vs ReLU budget on the default synthetic data (resnet8) for pixel,
   channel and layer gates (SNL) and the DeepReDuce-style layer-drop baseline.

Usage: python benchmarks/bench_core.py [--budgets 2k,5k,10k] [--skip-accuracy]   (the defaults: core.json's schedule)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

from relucomp.api import build_gated, compile as rc_compile, lowering_passes  # noqa: E402
from relucomp.budget import parse_count  # noqa: E402
from relucomp.export import export_onnx  # noqa: E402
from relucomp.infra import PassManager  # noqa: E402
from relucomp.ir import trace  # noqa: E402
from relucomp.models import build_model  # noqa: E402
from relucomp.passes.canonicalize import CanonicalizeReLUPass  # noqa: E402
from relucomp.passes.insert_gates import InsertGatesPass, gates_of  # noqa: E402
from relucomp.passes.shape_prop import ShapeAnalysisPass  # noqa: E402
from relucomp.passes.snl_search import binarize_to_budget  # noqa: E402

OUT = Path(__file__).parent / "results" / "core.json"


def machine() -> dict:
    from relucomp.pi.bench import machine_info

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": machine_info()["cpu"], "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": "cpu", "torch": torch.__version__, "load_average_at_start": os.getloadavg()}


def pass_times(budget: int = 50_000) -> dict:
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.randn(8, 3, 32, 32)
    t = {}
    t0 = time.perf_counter()
    gm = trace(model)
    t["trace"] = time.perf_counter() - t0
    pm = PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x[:1]), InsertGatesPass("pixel")], calibration=x)
    gm = pm.run(gm).gm
    for r in pm.records:
        t[r.name] = r.seconds
    gates = gates_of(gm)
    for g in gates.values():
        with torch.no_grad():
            g.alpha.uniform_()
    t0 = time.perf_counter()
    kept = binarize_to_budget(gates, budget)
    t["binarize_to_budget"] = time.perf_counter() - t0
    gm.eval()
    pm = PassManager(lowering_passes(x), calibration=x)
    t0 = time.perf_counter()
    gm = pm.run(gm).gm
    t["lowering_total_with_verification"] = time.perf_counter() - t0
    for r in pm.records:
        t[r.name + ("_after" if r.name in t else "")] = r.seconds
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = export_onnx(gm, Path(d) / "m.onnx", example=x[:1], verify_batch=x, max_relus=budget)
        t["export_onnx_and_verify"] = time.perf_counter() - t0
    non_training = sum(v for k, v in t.items() if k != "lowering_total_with_verification")
    return {"model": "resnet18", "budget": budget, "kept": kept, "onnx_relus": res["onnx_relus"],
            "seconds": {k: round(v, 4) for k, v in t.items()}, "total_non_training_seconds": round(non_training, 3),
            "goal_seconds": 10.0, "meets_goal": non_training < 10.0}


def step_cost(arch: str = "resnet8", batch: int = 64, steps: int = 30) -> dict:
    """Plain vs gated training step, interleaved so both see the same machine load.

    Each round runs one plain and one gated step; the reported time of each is
    the 20th percentile over rounds (robust to other processes on shared cores).
    """
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    plain = build_model(arch)
    gated, _ = build_gated(build_model(arch), x[:4], granularity="pixel")
    gates = list(gates_of(gated).values())
    gate_ids = {id(g.alpha) for g in gates}
    total = sum(g.total_relus for g in gates)
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.01, momentum=0.9)
    opt_g = torch.optim.SGD([p for p in gated.parameters() if id(p) not in gate_ids], lr=0.01, momentum=0.9)
    opt_a = torch.optim.Adam([g.alpha for g in gates], lr=0.01)
    plain.train()
    gated.train()

    def plain_step() -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(plain(x), y)
        opt_p.zero_grad()
        loss.backward()
        opt_p.step()
        return time.perf_counter() - t0

    def gated_step() -> float:
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(gated(x), y)
        loss = loss + 1e-3 * sum(g.alpha.sum() * g.elements_per_gate / total for g in gates)
        opt_g.zero_grad()
        opt_a.zero_grad()
        loss.backward()
        opt_g.step()
        opt_a.step()
        for g in gates:
            g.clamp_()
        return time.perf_counter() - t0

    tp, tg = [], []
    for i in range(steps + 3):
        a, b = (plain_step(), gated_step()) if i % 2 == 0 else tuple(reversed((gated_step(), plain_step())))
        if i >= 3:
            tp.append(a)
            tg.append(b)
    q = lambda v: statistics.quantiles(v, n=5)[0]  # noqa: E731 - 20th percentile
    p20, g20 = q(tp), q(tg)
    return {"model": arch, "batch": batch, "plain_step_s": round(p20, 4), "gated_step_s": round(g20, 4),
            "plain_step_median_s": round(statistics.median(tp), 4), "gated_step_median_s": round(statistics.median(tg), 4),
            "ratio": round(g20 / p20, 3), "goal_ratio": 1.3, "meets_goal": g20 / p20 <= 1.3,
            "method": "interleaved plain/gated steps, 20th percentile of each"}


def accuracy_vs_budget(budgets: list[int], search_epochs: int, finetune_epochs: int,
                       rows: list[dict] | None = None, on_row=None) -> list[dict]:
    rows = rows if rows is not None else []
    done = {(r["budget"], r["search"], r["granularity"]) for r in rows}
    configs = [("snl", "pixel"), ("snl", "channel"), ("snl", "layer"), ("layer-drop", "layer")]
    for budget in budgets:
        for search, gran in configs:
            if (budget, search, gran) in done:
                continue
            t0 = time.perf_counter()
            res = rc_compile(None, "synthetic", relu_budget=budget, granularity=gran, search=search,
                             search_epochs=search_epochs, finetune_epochs=finetune_epochs, progress=False)
            rep = res.report
            rows.append({"budget": budget, "search": search, "granularity": gran,
                         "relus_after": rep["relus"]["after"], "acc_dense_test": rep["accuracy"]["before"]["test"],
                         "acc_test": rep["accuracy"]["after"]["test"], "acc_val": rep["accuracy"]["after"]["val"],
                         "group_acc_test": rep["group_accuracy"]["after"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
            if on_row is not None:
                on_row(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="2k,5k,10k")
    ap.add_argument("--search-epochs", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume-rows", type=Path, default=None, help="JSON lines of finished accuracy rows")
    ap.add_argument("--update-timings", action="store_true",
                    help="re-measure pass times and step cost only, keeping the accuracy rows of --out")
    args = ap.parse_args(argv)
    result = {"benchmark": "core", "machine": machine(), "pass_times": pass_times(), "gated_step_cost": step_cost(),
              "gated_step_cost_resnet18": step_cost("resnet18", batch=32)}
    if args.update_timings and args.out.exists():
        old = json.loads(args.out.read_text())
        result = {k: v for k, v in old.items() if k not in result} | result   # accuracy rows and other sections kept
        if "accuracy_vs_budget" in result:                                   # ... with the machine they ran on
            result["accuracy_vs_budget"].setdefault("machine", old.get("machine"))
        args.skip_accuracy = True
    print(json.dumps(result["pass_times"], indent=1))
    print(json.dumps(result["gated_step_cost"], indent=1))
    print(json.dumps(result["gated_step_cost_resnet18"], indent=1))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_accuracy:
        budgets = [parse_count(b) for b in args.budgets.split(",")]
        rows = []
        if args.resume_rows and args.resume_rows.exists():  # rows of an interrupted run (JSON lines)
            rows = [json.loads(line) for line in args.resume_rows.read_text().splitlines() if line.strip()]
        result["accuracy_vs_budget"] = {"data": "synthetic (default)", "model": "resnet8 (default, 73,728 ReLUs)",
                                        "search_epochs": args.search_epochs, "finetune_epochs": args.finetune_epochs,
                                        "rows": rows}

        def save(_rows):
            args.out.write_text(json.dumps(result, indent=2))

        accuracy_vs_budget(budgets, args.search_epochs, args.finetune_epochs, rows=rows, on_row=save)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

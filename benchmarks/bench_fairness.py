"""Fairness benchmark (issue 5) → benchmarks/results/fairness.json.

UTKFace (real faces from ../shared/data when present, else the default
synthetic data), race as label and as protected group (as in Balancing Act),
default model (resnet8, trained on the data and cached).  One SNL mask search
at the budget is shared by the finetuning methods (warm start from the search
state), so the methods differ only in their finetune:

* ``nft``   plain finetune (CE + KD)
* ``el``    equalized loss
* ``ceag``  per-group excess-accuracy-gap constraints ψ_g ≤ ε
* ``ceag+both``  CEAG during the mask search as well (its own search)

For each: overall accuracy, max ψ_g and Ψ_PW on train and test, for the last
and the EMA weights, and the multiplier trajectories.

Usage: python benchmarks/bench_fairness.py [--budget 4k] [--limit N] [--data SPEC]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

from relucomp.api import compile as rc_compile  # noqa: E402
from relucomp.budget import parse_count  # noqa: E402
from relucomp.data import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UTK = ROOT.parent / "shared" / "data" / "utkface" / "UTKFace"
OUT = ROOT / "benchmarks" / "results" / "fairness.json"


def summarize(rep: dict) -> dict:
    f = rep["fairness"]
    out = {"relus": rep["relus"]["after"], "acc_dense_test": rep["accuracy"]["before"]["test"],
           "acc_test": rep["accuracy"]["after"]["test"], "seconds": rep["phases_seconds"]}
    for w, res in f["results"].items():
        for split in ("train", "test"):
            r = res[split]
            out[f"{w}_{split}"] = {"acc": r["overall"]["acc_compiled"], "max_psi": r["max_psi"],
                                   "psi_pw": r["psi_pw"], "psi": {g: v["psi"] for g, v in r["groups"].items()},
                                   "worst_group_error_ratio": r["worst_group_error_ratio"]["compiled"]}
    out["multiplier_trajectory"] = f["multiplier_trajectory"]
    out["search_multiplier_trajectory"] = f["search_multiplier_trajectory"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="data spec (default: utkface from ../shared if present)")
    ap.add_argument("--budget", default="4k")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--pretrain-epochs", type=int, default=15)
    ap.add_argument("--search-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=2.0)
    ap.add_argument("--methods", default="nft,el,ceag,ceag+both")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    spec = args.data or (f"utkface:{UTK}" if UTK.exists() else "synthetic")
    kw = {"target": "race", "fair_groups": "race"} if spec.startswith("utkface") else {}
    t0 = time.perf_counter()
    bundle = load_data(spec, limit=args.limit, **kw)
    budget = parse_count(args.budget)
    common = dict(relu_budget=budget, pretrain_epochs=args.pretrain_epochs, search_epochs=args.search_epochs,
                  finetune_epochs=args.finetune_epochs, tolerance=args.tolerance, progress=False,
                  fair_groups=bundle.group_attribute)
    snaps: dict[int, dict] = {}
    results: dict[str, dict] = {}
    methods = args.methods.split(",")
    shared = None
    for m in methods:
        t = time.perf_counter()
        if m == "ceag+both":
            res = rc_compile(None, bundle, fair_method="ceag", fair_phase="both", **common)
        else:
            extra = {}
            if shared is None:
                extra = {"search_snapshots": [budget], "on_snapshot": lambda b, s: snaps.__setitem__(b, s)}
            else:
                extra = {"search_state": shared}
            res = rc_compile(None, bundle, fair_method=m, **common, **extra)
            if shared is None:
                shared = snaps.get(budget)
        results[m] = summarize(res.report)
        results[m]["wall_seconds"] = round(time.perf_counter() - t, 1)
        if "dense" not in results:
            results["dense"] = {"acc_test": res.report["accuracy"]["before"]["test"],
                                "group_acc_test": res.report["group_accuracy"]["before"],
                                "group_counts_test": res.report["group_accuracy"]["test_counts"]}
        r = results[m]
        print(f"{m:10s} acc {r['last_test']['acc']:.2f}  test max ψ {r['last_test']['max_psi']:.2f}  "
              f"Ψ_PW {r['last_test']['psi_pw']:.2f}  train max ψ {r['last_train']['max_psi']:.2f}", flush=True)
        write(args, spec, bundle, budget, results, t0, done=m == methods[-1])
    return 0


def write(args, spec, bundle, budget, results, t0, *, done: bool) -> None:
    nft = results.get("nft")
    goals = {}
    for m, r in results.items():
        if m == "dense":
            continue
        goals[m] = {"test_max_psi_le_eps": r["last_test"]["max_psi"] <= args.tolerance,
                    "acc_within_1pt_of_nft": None if nft is None else r["last_test"]["acc"] >= nft["last_test"]["acc"] - 1.0}
    summary = bundle.summary()
    out = {"benchmark": "fairness", "complete": done, "data": spec, "target": bundle.target,
           "groups": bundle.group_names, "group_counts": summary.get("splits", summary),
           "model": "resnet8 (default)", "budget": budget, "tolerance_eps": args.tolerance,
           "epochs": {"pretrain": args.pretrain_epochs, "search": args.search_epochs, "finetune": args.finetune_epochs},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": "cpu",
                       "torch_threads": torch.get_num_threads()},
           "results": results, "goals": goals, "total_seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end compiles on the real data in ../shared/data (issue 3) → benchmarks/results/real_data.json.

* UTKFace (race as label and group): group counts per split, per-group accuracy
  of the dense model and of the compiled one.
* CIFAR-10 from the JPEG class folders (re-encoded as quality-75 JPEG, so
  accuracies are not comparable with published CIFAR-10 figures).

Short CPU schedules (a few epochs; ``--limit`` subsamples, stratified) — these
check that the whole pipeline runs on real data, they are not accuracy claims.
Skips a data set whose folder is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

from relucomp.api import compile as rc_compile  # noqa: E402
from relucomp.verify import onnx_relu_count  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "results" / "real_data.json"


def run(name: str, spec: str, *, budget: str, limit: int | None, epochs: tuple[int, int, int], **kw) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res = rc_compile(None, spec, relu_budget=budget, limit=limit, pretrain_epochs=epochs[0],
                         search_epochs=epochs[1], finetune_epochs=epochs[2], out_dir=d, progress=False, **kw)
        onnx_relus = onnx_relu_count(str(Path(d) / "model.onnx"))["relus"]
    rep = res.report
    return {"data": name, "spec": spec, "limit": limit, "model": rep["model"], "target": rep["data"]["target"],
            "group_attribute": rep["data"]["group_attribute"],
            "group_counts": {s: v["groups"] for s, v in rep["data"]["summary"]["splits"].items()}
            if "splits" in rep["data"]["summary"] else None,
            "epochs": {"pretrain": epochs[0], "search": epochs[1], "finetune": epochs[2]},
            "relus": rep["relus"], "onnx_relus_counted_from_graph": onnx_relus,
            "accuracy": rep["accuracy"], "group_accuracy_test": rep["group_accuracy"],
            "fairness_test_last": {k: rep["fairness"]["results"]["last"]["test"].get(k)
                                   for k in ("max_psi", "psi_pw")},
            "seconds": round(time.perf_counter() - t0, 1), "phases_seconds": rep["phases_seconds"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--cifar-limit", type=int, default=8000, help="real_data.json's (default 8000)")
    ap.add_argument("--only", choices=["utkface", "cifar10"], default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    utk = SHARED / "utkface" / "UTKFace"
    if args.only == "cifar10":
        pass
    elif utk.exists():
        rows.append(run("utkface", f"utkface:{utk}", budget="5k", limit=None, epochs=(12, 3, 3),
                        target="race", fair_groups="race", fair_method="nft"))
        print(json.dumps(rows[-1]["group_accuracy_test"]), flush=True)
    else:
        print(f"skip UTKFace: {utk} absent")
    c10 = SHARED / "cifar10-jpeg"
    if args.only == "utkface":
        pass
    elif c10.exists():
        rows.append(run("cifar10-jpeg", f"cifar10:{c10}", budget="5k", limit=args.cifar_limit, epochs=(12, 3, 3)))
        print(json.dumps(rows[-1]["accuracy"]), flush=True)
    else:
        print(f"skip CIFAR-10: {c10} absent")
    out = {"benchmark": "real_data", "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                  "device": "cpu", "torch_threads": torch.get_num_threads()},
           "note": "short CPU schedules: pipeline checks on real data, not accuracy claims", "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

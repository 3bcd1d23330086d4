"""Pruning benchmark (issue 4) → benchmarks/results/pruning.json.

1. Built-in ResNet18 (CIFAR, 32×32, random init — cost does not depend on the
   weights) with 30 / 50 / 70 % of its prunable coupled channels removed
   (global L1 ranking; once as is, once with every group's width rounded up to a
   multiple of 8): params, MACs and ReLUs counted from the exported ONNX
   graph (verified against torch by onnxruntime), ONNX file size, and
   onnxruntime CPU latency at batch 1 and 64 (median of several runs), all
   relative to the unpruned export.
2. Accuracy on the default synthetic data with resnet8: a dense model trained
   for a few epochs (cached), then channel pruning at 30 / 50 / 70 % (L1 and
   Taylor importance) or 90 % unstructured GMP sparsity, each followed by a
   short finetune (CE + KD from the dense model), test accuracy per group.

Usage: python benchmarks/bench_pruning.py [--quick] [--limit 3000] [--pretrain-epochs 6] [--finetune-epochs 1]
                                          [--out benchmarks/results/pruning.json]
"""

from __future__ import annotations

import argparse
import copy
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

from relucomp.api import analyze, inspect_onnx, pretrain  # noqa: E402
from relucomp.cache import cache_dir  # noqa: E402
from relucomp.evaluate import predict_split  # noqa: E402
from relucomp.export import export_onnx  # noqa: E402
from relucomp.latency import interleaved_latency  # noqa: E402
from relucomp.loaders import BatchLoader, first_batch  # noqa: E402
from relucomp.models import build_model  # noqa: E402
from relucomp.passes.finetune import FinetunePass  # noqa: E402
from relucomp.pruning import make_gmp, model_costs, prune  # noqa: E402
from relucomp.train import evaluate  # noqa: E402

OUT = Path(__file__).parent / "results" / "pruning.json"


def machine() -> dict:
    import onnxruntime

    return {"description": f"{os.cpu_count()}-core CPU (shared; no GPU)", "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]}


def ort_latencies(paths: list[Path], batch: int, runs: int) -> list[dict]:
    """Median / IQR / min latency of each model, measured interleaved (relucomp.latency: every round runs
    every model once in a fresh random order; thread-pool spinning off so the sessions don't steal cores)."""
    names = [str(i) for i in range(len(paths))]
    r = interleaved_latency(dict(zip(names, paths)), threads=os.cpu_count() or 1, batch=batch, repeats=runs, warmup=1)
    return [{**r["variants"][n], "runs": runs} for n in names]


def bench_resnet18(ratios, runs1: int, runs64: int, tmp: Path, round_to: int = 8) -> dict:
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    dense = analyze(build_model("resnet18").eval(), x)
    rows = []
    for r, rt in [(0.0, None), *[(r, None) for r in ratios], *[(r, round_to) for r in ratios]]:
        gm = copy.deepcopy(dense)
        t0 = time.perf_counter()
        stats = prune(gm, channel_ratio=r, importance="l1", round_to=rt) if r > 0 else None
        t_prune = time.perf_counter() - t0
        path = tmp / f"resnet18_p{int(100 * r)}_r{rt or 1}.onnx"
        info = export_onnx(gm.eval(), path, example=x[:1], verify_batch=x[:3])
        onnx_total = inspect_onnx(path)["total"]
        torch_costs = model_costs(gm)
        row = {"channel_ratio": r, "round_to": rt, "pruned_units": stats["pruned_units"] if stats else 0,
               "widths": [pl["shape_after"][0] for pl in stats["per_layer"]] if stats else None,
               "prunable_units": stats["prunable_units"] if stats else None, "prune_seconds": round(t_prune, 2),
               "params": onnx_total["params"], "macs": onnx_total["macs"], "relus": onnx_total["relus"],
               "torch_macs": torch_costs["macs"], "torch_params": torch_costs["params"],
               "onnx_bytes": info["bytes"], "ort_max_abs_diff": info["ort_max_abs_diff"], "path": path}
        rows.append(row)
        print(f"resnet18 p={r:.0%} round_to={rt}: {row['params']:,} params, {row['macs']:,} MACs, {row['relus']:,} ReLUs", flush=True)
    paths = [row.pop("path") for row in rows]
    for key, batch, runs in (("latency_b1", 1, runs1), ("latency_b64", 64, runs64)):
        for row, lat in zip(rows, ort_latencies(paths, batch, runs)):
            row[key] = lat
    for row in rows:
        print(f"resnet18 p={row['channel_ratio']:.0%} round_to={row['round_to']}: b1 {row['latency_b1']['median_ms']:.2f} ms, "
              f"b64 {row['latency_b64']['median_ms']:.1f} ms", flush=True)
    base = rows[0]
    for row in rows:
        row["relative"] = {k: round(row[k] / base[k], 4) for k in ("params", "macs", "relus", "onnx_bytes")}
        row["relative"]["latency_b1"] = round(row["latency_b1"]["median_ms"] / base["latency_b1"]["median_ms"], 4)
        row["relative"]["latency_b64"] = round(row["latency_b64"]["median_ms"] / base["latency_b64"]["median_ms"], 4)
        row["speedup_b64"] = round(base["latency_b64"]["median_ms"] / row["latency_b64"]["median_ms"], 3)
    return {"model": "resnet18 (CIFAR, 32x32, 10 classes)", "importance": "l1", "scope": "global",
            "latency": "onnxruntime CPUExecutionProvider, intra_op threads = cpu_count, thread-pool spinning off, interleaved rounds "
                       "in a fresh random order (relucomp/latency.py), "
                       f"{runs1} runs at batch 1, {runs64} at batch 64; median, IQR and min in ms",
            "rows": rows}


def bench_accuracy(ratios, pre_epochs: int, ft_epochs: int, limit: int | None) -> dict:
    from relucomp.data import load_data

    bundle = load_data("synthetic", limit=limit)
    train = BatchLoader(bundle.train, batch_size=128, shuffle=True, augment=True, seed=0)
    test = BatchLoader(bundle.test, batch_size=512)
    calib_x = first_batch(BatchLoader(bundle.val, batch_size=64), 32)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    models = cache_dir("models")
    model, info = pretrain(build_model("resnet8"), bundle, epochs=pre_epochs,
                           cache_path=models / f"bench-pruning-resnet8-synthetic-{limit}-{pre_epochs}.pt" if models else None)
    t_pre = time.perf_counter() - t0
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    dense = analyze(model.eval(), calib_x)
    base = model_costs(dense)
    rows = [{"method": "dense", "test_acc": evaluate(dense, test)["acc"], "group_acc": predict_split(dense, bundle.test).group_acc_by_name(bundle.group_names),
             "macs": base["macs"], "params": base["params"], "relus": base["relus"]}]
    configs = [("channels-l1", r, "l1", None) for r in ratios] + [("channels-taylor", 0.5, "taylor", None),
                                                                  ("gmp", None, None, 0.9)]
    for method, ratio, imp, sparsity in configs:
        gm = copy.deepcopy(dense)
        t0 = time.perf_counter()
        gmp = None
        if ratio is not None:
            prune(gm, channel_ratio=ratio, importance=imp, calib=train if imp == "taylor" else None)
        else:
            gmp = make_gmp(gm, sparsity=sparsity, total_steps=ft_epochs * len(train))
        acc0 = evaluate(gm, test)["acc"]
        FinetunePass(train_loader=train, teacher=teacher, epochs=ft_epochs, lr=0.005, after_step=gmp)(gm)
        sp = gmp.bake() if gmp is not None else None
        c = model_costs(gm)
        row = {"method": method, "channel_ratio": ratio, "importance": imp, "sparsity": sparsity,
               "test_acc_before_finetune": acc0, "test_acc": evaluate(gm, test)["acc"],
               "group_acc": predict_split(gm, bundle.test).group_acc_by_name(bundle.group_names), "macs": c["macs"], "params": c["params"],
               "relus": c["relus"], "seconds": round(time.perf_counter() - t0, 1)}
        if sp is not None:
            row["achieved_sparsity"] = round(sp["achieved"], 4)
        rows.append(row)
        print(f"resnet8 {method} {ratio or sparsity}: acc {acc0:.1f}% -> {row['test_acc']:.1f}% "
              f"({c['macs']:,} MACs, {c['params']:,} params)", flush=True)
    return {"model": "resnet8", "data": "synthetic (default)", "data_summary": bundle.summary().get("splits"),
            "pretrain_epochs": pre_epochs, "pretrain_seconds": round(t_pre, 1), "pretrain_info": info,
            "finetune_epochs": ft_epochs, "finetune": "SGD lr 0.005 cosine, CE + KD (w=0.5) from the dense model",
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer runs, less data")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--limit", type=int, default=3000, help="synthetic images generated (default 3000: keeps the run < 10 min)")
    ap.add_argument("--pretrain-epochs", type=int, default=6)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    args = ap.parse_args()
    ratios = [0.3, 0.5, 0.7]
    t0 = time.perf_counter()
    res = {"benchmark": "channel pruning / GMP (issue 4)", "machine": machine(),
           "notes": ["channel_ratio = fraction of the prunable coupled channels (units) removed; MACs fall faster "
                     "(quadratically) since both the input and output widths of a conv shrink",
                     "params/MACs/ReLUs are counted from the exported ONNX graphs (relucomp inspect)",
                     "latency is on a shared 2-core CPU (see load averages): compare rows of the same run only",
                     "accuracy: a weak dense resnet8 (few epochs on a 3000-image synthetic set) and a 1-epoch "
                     "finetune, so the accuracy numbers only show trends, not what longer finetuning reaches"]}
    with tempfile.TemporaryDirectory() as d:
        res["resnet18"] = bench_resnet18(ratios, 5 if args.quick else 20, 2 if args.quick else 7, Path(d))
    if not args.skip_accuracy:
        res["accuracy"] = bench_accuracy(ratios, 2 if args.quick else args.pretrain_epochs,
                                         1 if args.quick else args.finetune_epochs, 1000 if args.quick else args.limit)
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    res["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))
    print(f"wrote {args.out} in {res['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()

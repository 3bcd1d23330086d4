"""Accuracy at the ReLU budget, before vs after the accuracy recipe (issue 11) → benchmarks/results/accuracy.json.

Parts (same data, model and seeds before and after):

* ``synthetic``: the default resnet8 on the built-in synthetic data, starting from the embedded
  trained weights, at 2k / 5k / 15k ReLUs.  *after* = ``relucomp.compile`` with the default effort
  (``quick``); *before* = the compiler as it was before this work (git commit ``--before-commit``,
  run from an exported copy of that tree in a subprocess) with its defaults (4 search + 4 finetune
  epochs, identity replacement, irreversible pinning), given the same dense weights.
* ``cifar``: CIFAR-10 JPEG folders (``--cifar PATH``), ``--cifar-train`` training images (stratified,
  fixed), the full official test set; a dense resnet8 pretrained once (``--cifar-pretrain`` epochs,
  cached) is the start of every run; budgets 5k and 15k, ``--seeds`` seeds, before (4 + 4 epochs) and
  after (``--effort``, default ``quick`` = 3 + 3 epochs).

Rows are written to the JSON as they finish and finished rows are skipped on a re-run (resumable).
Each row records the wall time and the load average before/after (the machine may be shared:
timings are upper bounds).

Usage: python benchmarks/bench_accuracy.py [--parts synthetic,cifar] [--seeds 0,1] [--budgets 2k,5k,15k]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from relucomp.budget import parse_count  # noqa: E402

OUT = Path(__file__).parent / "results" / "accuracy.json"
ROOT = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "3397225"  # main before the accuracy recipe


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
            "torch": torch.__version__}


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"benchmark": "accuracy", "rows": []}


def save_results(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, path)


ROW_DEFAULTS = {"dense_epochs": 15, "effort": "quick"}   # rows written before these keys existed


def have(res: dict, **key) -> bool:
    return any(all(r.get(k, ROW_DEFAULTS.get(k)) == v for k, v in key.items()) for r in res["rows"])


# ---------------------------------------------------------------------------
# data / dense models
# ---------------------------------------------------------------------------

def cifar_bundle(path: str, n_train: int, seed: int = 0):
    from relucomp.data import load_data

    b = load_data(f"cifar10:{path}", seed=0)
    g = torch.Generator().manual_seed(1234 + seed * 0)  # one fixed subset for every seed
    labels = b.train.labels
    per = n_train // b.num_classes
    idx = []
    for c in range(b.num_classes):
        cand = torch.nonzero(labels == c).flatten()
        idx.append(cand[torch.randperm(cand.numel(), generator=g)[:per]])
    idx = torch.cat(idx).sort().values
    return dataclasses.replace(b, train=b.train.subset(idx)), idx


def dense_cifar(bundle, epochs: int, cache: Path) -> tuple[torch.nn.Module, dict]:
    from relucomp.api import pretrain
    from relucomp.models import load_model

    path = cache / f"cifar_resnet8_dense_{len(bundle.train)}_{epochs}.pt"
    model = load_model("resnet8", num_classes=10)
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model, {"cached": str(path)}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, info = pretrain(model, bundle, epochs=epochs, lr=0.05, batch_size=128, seed=0, progress=False)
    info["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, info


# ---------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------

def run_after(model, data, budget: int, seed: int, effort: str, model_spec=None) -> dict:
    from relucomp.api import compile as rc_compile

    t0 = time.perf_counter()
    res = rc_compile(model_spec if model is None else model, data, relu_budget=budget, seed=seed, effort=effort,
                     export=False, progress=False)
    r = res.report
    return {"test_acc": r["accuracy"]["after"]["test"], "dense_test_acc": r["accuracy"]["before"]["test"],
            "relus": r["relus"]["after"], "seconds": round(time.perf_counter() - t0, 1),
            "phases_seconds": r["phases_seconds"], "pretrain": r.get("pretrain"),
            "kept_per_layer": {p["site"]: p["relus_after"] for p in r["per_layer"]},
            "refine": r["search"].get("refine"), "reopened": r["search"].get("reopened")}


BEFORE_SNIPPET = r"""
import json, sys, time, warnings, torch
warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[5]))
from relucomp.api import compile as rc_compile
from relucomp.models import load_model
data = sys.argv[1]
model = load_model("resnet8", num_classes=10)
model.load_state_dict(torch.load(sys.argv[2], weights_only=True))
if "|" in data:  # a data spec and the index file of the training subset
    import dataclasses
    from relucomp.data import load_data
    spec, idx_file = data.split("|")
    b = load_data(spec, seed=0)
    data = dataclasses.replace(b, train=b.train.subset(torch.load(idx_file, weights_only=True)))
t0 = time.perf_counter()
res = rc_compile(model, data, relu_budget=int(sys.argv[3]), seed=int(sys.argv[4]), export=False, progress=False)
r = res.report
print("RESULT " + json.dumps({"test_acc": r["accuracy"]["after"]["test"], "dense_test_acc": r["accuracy"]["before"]["test"],
      "relus": r["relus"]["after"], "seconds": round(time.perf_counter() - t0, 1), "phases_seconds": r["phases_seconds"],
      "kept_per_layer": {p["site"]: p["relus_after"] for p in r["per_layer"]}}))
"""


def before_tree(commit: str) -> Path:
    d = Path(tempfile.gettempdir()) / f"relucomp-before-{commit}"
    if not (d / "relucomp").exists():
        d.mkdir(parents=True, exist_ok=True)
        arch = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(d)], input=arch, check=True)
        (d / "relucomp" / "passes").symlink_to(d / "passes")
    return d


def run_before(state_path: Path, data: str, budget: int, seed: int, commit: str, threads: int) -> dict:
    tree = before_tree(commit)
    env = dict(os.environ, PYTHONPATH=str(tree))
    p = subprocess.run([sys.executable, "-c", BEFORE_SNIPPET, data, str(state_path), str(budget), str(seed),
                        str(threads)], env=env, capture_output=True, text=True, cwd=str(tree))
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"before run failed:\n{p.stderr[-3000:]}")


def summarize(groups: dict[str, list[float]]) -> dict:
    """Mean, sample standard deviation (n ≥ 2), range and values of each group of test accuracies."""
    import statistics

    return {k: {"mean": round(statistics.fmean(v), 2), "std": round(statistics.stdev(v), 2) if len(v) > 1 else None,
                "min": round(min(v), 2), "max": round(max(v), 2), "n": len(v), "values": [round(x, 2) for x in v]}
            for k, v in sorted(groups.items())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="synthetic,cifar")
    ap.add_argument("--recipes", default="after,before")
    ap.add_argument("--budgets", default="2k,5k,15k")
    ap.add_argument("--cifar-budgets", default="5k,15k")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--synthetic-seeds", default="0")
    ap.add_argument("--effort", default="quick")
    ap.add_argument("--cifar", default="/work/shared/data/cifar10-jpeg")
    ap.add_argument("--cifar-train", type=int, default=10000)
    ap.add_argument("--cifar-pretrain", type=int, default=30,
                    help="dense CIFAR-10 epochs (30: accuracy.json's 68.0 %% model; its before rows at 15 too)")
    ap.add_argument("--before-commit", default=BEFORE_COMMIT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = load_results(out)
    res["machine"] = machine()
    res["note"] = ("before = the compiler at commit %s with its defaults (4 search + 4 finetune epochs); after = "
                   "relucomp.compile with effort=%s; both start from the same dense weights; load averages are "
                   "recorded per row (shared machine: times are upper bounds)" % (args.before_commit, args.effort))
    recipes = args.recipes.split(",")
    cache = Path(os.environ.get("RELUCOMP_CACHE", Path.home() / ".cache" / "relucomp")) / "bench"
    cache.mkdir(parents=True, exist_ok=True)

    def record(row: dict) -> None:
        res["rows"].append(row)
        save_results(out, res)
        print(json.dumps({k: row[k] for k in ("part", "recipe", "budget", "seed", "test_acc", "seconds")}), flush=True)

    if "synthetic" in args.parts:
        from relucomp.data import load_data
        from relucomp.recipe import default_pretrained

        bundle = load_data("synthetic", seed=0)
        state = cache / "synthetic_resnet8_embedded.pt"
        torch.save(default_pretrained("resnet8", bundle), state)
        for budget in [parse_count(b) for b in args.budgets.split(",")]:
            for seed in [int(s) for s in args.synthetic_seeds.split(",")]:
                for recipe in recipes:
                    key = dict(part="synthetic", recipe=recipe, budget=budget, seed=seed)
                    if have(res, **key):
                        continue
                    load0 = os.getloadavg()
                    if recipe == "after":
                        r = run_after(None, "synthetic", budget, seed, args.effort, model_spec=None)
                    else:
                        r = run_before(state, "synthetic", budget, seed, args.before_commit, args.threads)
                    record({**key, **r, "effort": args.effort if recipe == "after" else "4+4 epochs",
                            "load_before": load0, "load_after": os.getloadavg()})

    if "cifar" in args.parts and Path(args.cifar).exists():
        bundle, idx = cifar_bundle(args.cifar, args.cifar_train)
        dense, dinfo = dense_cifar(bundle, args.cifar_pretrain, cache)
        res["cifar_dense"] = {"train_images": len(bundle.train), "test_images": len(bundle.test),
                              "pretrain_epochs": args.cifar_pretrain, **dinfo}
        save_results(out, res)
        state = cache / f"cifar_dense_state_{args.cifar_pretrain}.pt"
        torch.save(dense.state_dict(), state)
        idx_path = cache / "cifar_train_index.pt"
        torch.save(idx, idx_path)
        for budget in [parse_count(b) for b in args.cifar_budgets.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for recipe in recipes:
                    key = dict(part="cifar", recipe=recipe, budget=budget, seed=seed, dense_epochs=args.cifar_pretrain,
                               effort=args.effort if recipe == "after" else "4+4 epochs")
                    if have(res, **key):
                        continue
                    load0 = os.getloadavg()
                    if recipe == "after":
                        r = run_after(copy.deepcopy(dense), bundle, budget, seed, args.effort)
                    else:
                        r = run_before(state, f"cifar10:{args.cifar}|{idx_path}", budget, seed, args.before_commit, args.threads)
                    record({**key, **r, "train_images": len(bundle.train), "test_images": len(bundle.test),
                            "load_before": load0, "load_after": os.getloadavg()})

    # summary: mean and spread per (part, recipe, budget)
    summary = {}
    for r in res["rows"]:
        name = f"{r['part']}/{r['recipe']}/{r['budget']}"
        if r["part"] == "cifar":  # rows differ by the dense checkpoint and, for after, the effort
            name += f"/dense{r.get('dense_epochs', 15)}" + (f"/{r.get('effort', 'quick')}" if r["recipe"] == "after" else "")
        summary.setdefault(name, []).append(r["test_acc"])
    res["summary"] = summarize(summary)
    save_results(out, res)
    print(json.dumps(res["summary"], indent=2))


if __name__ == "__main__":
    main()

"""Differentially private finetuning benchmark (issue 13) → benchmarks/results/dp.json.

UTKFace (race as label and as group, from ../shared/data when present), resnet8
at one ReLU budget.  One shared SNL mask search from seed 0's dense model (non-private: the
masks and post-search weights are treated as public and start every finetune), then, per seed
(seed 0's dense model is the KD teacher and the ψ_g reference of every row; seeds vary only the
finetune's randomness — ``--no-shared-dense``: each seed pretrains its own dense model, as the
earlier dp_perseed_dense.json did):

* ``non-private``   plain finetune (CE + KD), as ``relucomp compile``
* ``eps=inf``       DP-SGD machinery without noise (per-sample clipping, Poisson sampling)
* ``eps=8,3,1``     DP-SGD to (ε, δ)-DP of the finetune w.r.t. the training split

For each: test accuracy and max ψ_g (vs the dense model) for the last and the
averaged (EMA) weights, ε spent (accountant), δ, noise multiplier.  The script
is incremental: the JSON is rewritten after every run and finished runs are
skipped on a re-run (the search state is kept under the relucomp cache).

Usage: python benchmarks/bench_dp.py [--budget 4k] [--eps 8,inf,1,3] [--limit N]   (the defaults: dp.json's schedule)
The defaults are dp.json's schedule.  The files, in today's options (the defaults changed in session 22 from
--dp-clip 1 --dp-grid 1:0.1,4:0.1,8:0.1,4:0.2 --seeds 0,1 without --ceag to dp.json's):
dp_clip30.json: python benchmarks/bench_dp.py --eps 8 --no-ceag --out benchmarks/results/dp_clip30.json
                    (rows named eps=8+C30; C ∈ {1, 3, 8}: --dp-clip C --dp-grid 8:0.1/C, seed 0 alike)
dp_clipauto.json: dp_clip30.json copied, then python benchmarks/bench_dp.py --eps 8 --no-ceag \
                    --dp-grid 8:recipe --dp-clip auto --out benchmarks/results/dp_clipauto.json
                    (--dp-max-grad-norm auto and the library's default DP LR; rows named eps=8+Cauto)
dp.json: dp_clip30.json copied to dp.json, then two processes filling its other rows (merge_disk):
    python benchmarks/bench_dp.py --eps 8,inf --threads 1
    python benchmarks/bench_dp.py --eps 8,1,3 --tune-eps 8 --no-ceag --threads 1
dp_C1.json (the C = 1 table, an earlier machine's dense model and masks):
    python benchmarks/bench_dp.py --dp-clip 1 --dp-grid 8:0.1 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
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

from relucomp.api import compile as rc_compile  # noqa: E402
from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.budget import parse_count  # noqa: E402
from relucomp.cache import cache_root  # noqa: E402
from relucomp.data import load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UTK_CANDIDATES = [ROOT.parent / "shared" / "data" / "utkface" / "UTKFace", Path("/work/shared/data/utkface/UTKFace")]
OUT = ROOT / "benchmarks" / "results" / "dp.json"


def clip_arg(v: str):
    """--dp-clip: a clipping norm, or "auto" (the library's placement from the validation split's norms)."""
    return "auto" if v == "auto" else float(v)


def summarize(rep: dict) -> dict:
    res = rep["fairness"]["results"]
    out = {"relus": rep["relus"]["after"], "acc_dense_test": rep["accuracy"]["before"]["test"],
           "seconds": rep["phases_seconds"]}
    for w, r in res.items():
        t = r["test"]
        out[w] = {"acc": t["overall"]["acc_compiled"], "max_psi": t["max_psi"], "psi_pw": t["psi_pw"],
                  "worst_group_error_ratio": t["worst_group_error_ratio"]["compiled"],
                  "psi": {g: v["psi"] for g, v in t["groups"].items()},
                  "val_max_psi": r["val"]["max_psi"] if "val" in r else None,
                  "val_acc": r["val"]["overall"]["acc_compiled"] if "val" in r else None}
    if rep.get("dp"):
        d = rep["dp"]
        out["dp"] = {k: d[k] for k in ("epsilon_target", "epsilon_spent", "delta", "noise_multiplier",
                                       "max_grad_norm", "sample_rate", "expected_batch_size", "steps", "accountant",
                                       "conversion", "history")}
        out["dp"].update({k: d.get(k) for k in ("lr", "heldout_grad_norms")})
        if d.get("fairness"):
            out["dp"]["fairness"] = {k: d["fairness"][k] for k in ("method", "dual_every", "dual_lr", "tolerance",
                                                                   "multipliers", "weights", "trace")}
    return out


def aggregate(runs: dict) -> dict:
    """One row from per-seed summaries: mean and sample std over seeds of every accuracy / fairness number."""
    keys = sorted(runs, key=int)
    rs = [runs[k] for k in keys]
    first = rs[0]
    out: dict = {"seeds": [int(k) for k in keys], "relus": first["relus"], "acc_dense_test": first["acc_dense_test"]}
    for w in ("last", "ema"):
        if not all(w in r for r in rs):
            continue
        agg: dict = {}
        for m in ("acc", "max_psi", "psi_pw", "worst_group_error_ratio", "val_acc", "val_max_psi"):
            vals = [r[w][m] for r in rs if r[w].get(m) is not None]
            if vals:
                agg[m] = statistics.fmean(vals)
                agg[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
                agg[f"{m}_by_seed"] = vals
        agg["psi"] = {g: statistics.fmean(r[w]["psi"][g] for r in rs) for g in first[w]["psi"]}
        out[w] = agg
    if "dp" in first:
        out["dp"] = {k: v for k, v in first["dp"].items() if k != "history"}
        out["dp"]["epsilon_spent_by_seed"] = [r["dp"]["epsilon_spent"] for r in rs]
    for k in ("lr", "epochs"):
        if k in first:
            out[k] = first[k]
    out["runs"] = runs
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "device": "cpu", "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg": os.getloadavg()}


def parser() -> argparse.ArgumentParser:
    """The options; their defaults are dp.json's schedule (``tests/test_benchmarks.py`` checks it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--budget", default="4k")
    ap.add_argument("--eps", default="8,inf,1,3")
    ap.add_argument("--limit", type=int, default=12000, help="UTKFace images (the 32 px cache holds 12,000)")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--search-epochs", type=int, default=1)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--dp-grid", default="8:0.00333",
                    help="DP finetune schedules EPOCHS:LR tried at the first ε of --eps (seed 0); the one with the "
                         "best *validation* accuracy of the averaged weights (ties: lower validation max ψ_g) is "
                         "used for every ε and seed (never the test split). Default: dp.json's, the one chosen "
                         "on validation (dp_clip*.json; the earlier grid was 1:0.1,4:0.1,8:0.1,4:0.2 at C = 1)")
    ap.add_argument("--dp-batch-size", type=int, default=512, help="expected Poisson batch (Berrada et al.: large)")
    ap.add_argument("--seeds", default="0,1,2,3",
                    help="seeds of the finetunes (non-private and DP: batch order, Poisson sampling, noise; with "
                         "--no-shared-dense also of the dense model each seed pretrains); the data split and the "
                         "searched masks / starting weights (seed 0's) are shared")
    ap.add_argument("--ema-decay", type=float, default=0.98)
    ap.add_argument("--dp-kd-weight", type=float, default=0.5,
                    help="finetune.kd_weight of the DP rows (the rows in dp.json were measured at 0.5; the "
                         "non-private rows use the default 0.7)")
    ap.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=True,
                    help="De et al.'s EMA warm-up min(decay, (1+t)/(10+t)), the DP default (--no-ema-warmup: the "
                         "non-private compile's average, which keeps a share of the post-search weights)")
    ap.add_argument("--tune-eps", default=None,
                    help="the ε the DP schedule is chosen at (default: the first of --eps); lets a second process "
                         "run other ε rows against the same tuning")
    ap.add_argument("--ceag", action=argparse.BooleanOptionalAction, default=True,
                    help="(default on, as dp.json) also run the rows 'non-private+ceag' (the non-private compile "
                         "with CEAG) and 'eps=8+ceag' "
                         "(DP-SGD at the tuning ε with --fair-method ceag: duals on the validation split, weighted "
                         "clipped gradients; relucomp.dp_fairness), same schedule and seeds")
    ap.add_argument("--dp-dual-lr", type=float, default=0.2,
                    help="fairness.heldout_dual_lr of the 'eps=8+ceag' row (the held-out duals' step; 0.2 was "
                         "chosen over 0.05 on validation, seeds 0 and 1)")
    ap.add_argument("--dp-clip", type=clip_arg, default=30.0,
                    help="per-sample clipping norm C (default 30, dp.json's, chosen on validation; 1 before) "
                         "(with C > 1, scale the --dp-grid LRs by 1/C to keep the step "
                         "size of clipped samples): a larger C keeps more of the per-sample gradients' relative size "
                         "(less clipping bias against hard groups) at the price of more noise (σ·C)")
    ap.add_argument("--dp-augmult", type=int, default=1,
                    help="augmentation multiplicity K of the DP rows (--dp-augmult); K > 1 names the rows "
                         "'eps=E+augmultK' and tunes its own schedule key")
    ap.add_argument("--shared-dense", action=argparse.BooleanOptionalAction, default=True,
                    help="every seed's rows use seed 0's dense model (the one the search started from) as KD teacher "
                         "and ψ_g reference, so seeds vary only the finetune (the default, as dp.json; "
                         "--no-shared-dense: each seed pretrains its own, as dp_perseed_dense.json)")
    ap.add_argument("--threads", type=int, default=2, help="≤ 2 on the shared 2-core machine")
    ap.add_argument("--fair-splits", default="val,test", help="splits the fairness section evaluates")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    if args.fair_splits != "train,val,test":  # shared CPU: skip the fairness evaluation on the train split
        import relucomp.stages.fairness as fs

        full, keep = fs.fairness_section, set(args.fair_splits.split(","))
        fs.fairness_section = lambda preds, *a, **k: full({s: p for s, p in preds.items() if s in keep}, *a, **k)
    utk = next((p for p in UTK_CANDIDATES if p.exists()), None)
    spec = args.data or (f"utkface:{utk}" if utk else "synthetic")
    kw = {"target": "race", "fair_groups": "race"} if spec.startswith("utkface") else {"fair_groups": "group"}
    bundle = load_data(spec, limit=args.limit, **kw)
    budget = parse_count(args.budget)
    common = dict(relu_budget=budget, pretrain_epochs=args.pretrain_epochs, search_epochs=args.search_epochs,
                  finetune_epochs=args.finetune_epochs, progress=False, fair_groups=bundle.group_attribute,
                  fair_method="nft", export=False,
                  batch_size=128)  # the non-private batch these rows were measured with (the quick preset's is now 64)
    results: dict = {}
    if args.out.exists():
        prev = json.loads(args.out.read_text())
        sched, old = schedule(args, spec, budget), prev.get("schedule") or {}
        if all(old.get(k) == sched[k] for k in sched if k != "seeds"):  # runs are kept per seed: more seeds add runs
            results = prev.get("results", {})
        elif all(old.get(k) == sched[k] for k in SHARED):  # only the DP schedule changed: keep the shared runs
            results = {k: v for k, v in prev.get("results", {}).items() if k in ("dense", "non-private")}
    state_path = (cache_root() or Path(tempfile.gettempdir())) / "bench_dp" / f"search-{budget}-{args.pretrain_epochs}-{args.search_epochs}-{args.limit}.pt"
    snaps: dict[int, dict] = {}
    t0 = time.perf_counter()
    shared = torch.load(state_path, weights_only=True) if state_path.exists() else None
    args.state_digest = state_digest(shared) if shared is not None else None
    on_disk = json.loads(args.out.read_text()).get("search_state") if args.out.exists() else None
    if results and (shared is None or on_disk != args.state_digest):
        # the rows on disk came from other masks / starting weights than the cached search state
        print(f"the rows in {args.out} were not measured from the cached search state at {state_path}; "
              "starting the JSON afresh", flush=True)
        results = {}
    if "non-private" not in results or shared is None:
        t = time.perf_counter()
        extra = ({"search_snapshots": [budget], "on_snapshot": lambda b, s: snaps.__setitem__(b, s)}
                 if shared is None else {"search_state": shared})
        res = rc_compile(None, bundle, **common, **extra)  # seed 0: its dense model is the search's start
        if shared is None:
            shared = snaps.get(budget) or {k: v.clone() for k, v in res.model.state_dict().items()}
            state_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(shared, state_path)
        args.state_digest = state_digest(shared)
        results["non-private"] = summarize(res.report)
        results["non-private"]["wall_seconds"] = round(time.perf_counter() - t, 1)
        results["dense"] = {"cache_file": (res.report.pretrain or {}).get("cached"),
                            "acc_test": res.report["accuracy"]["before"]["test"],
                            "group_acc_test": res.report["group_accuracy"]["before"],
                            "group_counts_test": res.report["group_accuracy"]["test_counts"]}
        report_line("non-private", results["non-private"])
        write(args, spec, bundle, budget, results, t0)
    seeds = [int(v) for v in args.seeds.split(",")]
    # EPOCHS:LR, LR a number (finetune.lr as given) or "recipe" (unset: the library's per-unit-of-C default)
    grid = [(int(e), lr if lr == "recipe" else float(lr)) for e, lr in (g.split(":") for g in args.dp_grid.split(","))]
    eps_list = args.eps.split(",")
    tune_eps = args.tune_eps or eps_list[0]

    dense_module = None
    if args.shared_dense:  # seed 0's dense model (the pretrain cache file the first compile read)
        from relucomp.models.loading import build_model
        from relucomp.train import load_state

        path = results["dense"].get("cache_file")
        if not path:
            sys.exit("--shared-dense: the first compile did not read its dense model from the cache; run again")
        dense_module = build_model("resnet8", num_classes=len(bundle.train.class_names))
        dense_module.load_state_dict(load_state(path)["state_dict"])

    def dense_for(seed: int) -> tuple:
        """(model, overrides) of a run at ``seed``: with --shared-dense, seed 0's dense model used as it is
        (``pretrain_epochs`` 0: not trained further); else ``None`` (the seed pretrains its own, cached)."""
        if dense_module is None or seed == 0:
            return None, {}
        return copy.deepcopy(dense_module), {"pretrain_epochs": 0}

    def np_run(seed: int, fair: str = "nft") -> dict:
        t = time.perf_counter()
        model, kw = dense_for(seed)
        res = rc_compile(model, bundle, **{**common, "fair_method": fair, **kw}, search_state=shared, seed=seed)
        r = summarize(res.report)
        r["wall_seconds"] = round(time.perf_counter() - t, 1)
        return r

    np_runs = results["non-private"].setdefault("runs", {"0": {k: v for k, v in results["non-private"].items()
                                                                  if k != "runs"}})
    for seed in seeds:
        if str(seed) not in np_runs:
            np_runs[str(seed)] = np_run(seed)
            report_line(f"non-private seed {seed}", np_runs[str(seed)])
            results["non-private"] = aggregate(np_runs)
            write(args, spec, bundle, budget, results, t0)
    results["non-private"] = aggregate(np_runs)
    tuning = results.setdefault("tuning", {"by": "validation accuracy of the averaged weights (ties: lower "
                                                  "validation max ψ_g), seed 0, at the first ε; never the test split",
                                           "at_eps": tune_eps, "runs": {}})

    def dp_run(e: str, epochs: int, lr: float, seed: int, fair: str = "nft") -> dict:
        t = time.perf_counter()
        model, kw = dense_for(seed)
        res = rc_compile(model, bundle, **{**common, "finetune_epochs": epochs, "fair_method": fair, **kw},
                         config={"finetune": {**({} if lr == "recipe" else {"lr": lr}), "ema_decay": args.ema_decay,
                                              "ema_warmup": args.ema_warmup, "kd_weight": args.dp_kd_weight},
                                 **({"fairness": {"heldout_dual_lr": args.dp_dual_lr}} if fair == "ceag" else {})},
                         seed=seed,
                         search_state=shared, dp_epsilon=float(e), dp_batch_size=args.dp_batch_size,
                         dp_augmult=args.dp_augmult, dp_max_grad_norm=args.dp_clip)
        r = summarize(res.report)
        r.update(lr=lr, epochs=epochs, seed=seed, wall_seconds=round(time.perf_counter() - t, 1))
        return r

    aug = row_suffix(args)
    keys = []
    for epochs, lr in grid:  # choose the DP schedule on validation at the first ε
        key = f"epochs={epochs},lr={lr if isinstance(lr, str) else format(lr, 'g')}{aug}"
        keys.append(key)
        if key not in tuning["runs"]:
            tuning["runs"][key] = dp_run(tune_eps, epochs, lr, seeds[0])
            report_line(f"eps={tune_eps} {key}", tuning["runs"][key])
            write(args, spec, bundle, budget, results, t0)
    best = max(keys, key=lambda k: (round(tuning["runs"][k]["ema"]["val_acc"], 6),
                                              -tuning["runs"][k]["ema"]["val_max_psi"]))
    tuning["chosen"] = best
    chosen = tuning["runs"][best]
    for e in eps_list:
        name = f"eps={e}{aug}"
        runs = (results.get(name) or {}).get("runs") or {}
        if e == tune_eps:  # the tuning run is this row's run for its seed
            runs.setdefault(str(chosen.get("seed", seeds[0])), chosen)
        for seed in seeds:
            if str(seed) not in runs:
                runs[str(seed)] = dp_run(e, chosen["epochs"], chosen["lr"], seed)
                report_line(f"{name} seed {seed}", runs[str(seed)])
                results[name] = aggregate(runs)
                write(args, spec, bundle, budget, results, t0)
        results[name] = aggregate(runs)
    def fill_row(name: str, run) -> None:
        """Run ``run(seed)`` for the seeds the row lacks (the JSON rewritten after each), then aggregate."""
        runs = (results.get(name) or {}).get("runs") or {}
        for seed in seeds:
            if str(seed) not in runs:
                runs[str(seed)] = run(seed)
                report_line(f"{name} seed {seed}", runs[str(seed)])
                results[name] = aggregate(runs)
                write(args, spec, bundle, budget, results, t0)
        results[name] = aggregate(runs)

    if args.ceag:
        # the non-private compile with its default fairness method (CEAG, duals on the training data)
        fill_row("non-private+ceag", lambda seed: np_run(seed, fair="ceag"))
        # DP + CEAG with held-out duals, at the tuning ε, with the chosen schedule
        fill_row(f"eps={tune_eps}{aug}+ceag" + ("" if args.dp_dual_lr == 0.2 else f"(dual_lr={args.dp_dual_lr:g})"),
                 lambda seed: dp_run(tune_eps, chosen["epochs"], chosen["lr"], seed, fair="ceag"))
    write(args, spec, bundle, budget, results, t0)
    return 0


def table(d: dict) -> str:
    """Markdown table (README) from dp.json."""
    def f(v, nd=2):
        return "–" if v is None else (v if isinstance(v, str) else f"{v:.{nd}f}")

    def pm(a: dict, m: str) -> str:
        v, sd = a.get(m), a.get(f"{m}_std")
        return f(v) if not sd else f"{f(v)} ± {f(sd)}"

    rows = ["| run | ε spent (δ) | σ | test acc last / EMA | test max ψ_g last / EMA | test Ψ_PW last / EMA |",
            "|---|---|---|---|---|---|"]
    for name, r in d["results"].items():
        if name in ("dense", "tuning"):
            continue
        dp = r.get("dp") or {}
        eps = "non-private" if not dp else ("∞ (no noise)" if dp.get("epsilon_spent") in (None, "inf")
                                            else f"{dp['epsilon_spent']:.2f} ({dp['delta']:.0e})")
        sig = f(dp.get("noise_multiplier"), 3) if dp else "–"
        last, ema = r.get("last", {}), r.get("ema", {})
        n = len(r.get("seeds") or [0])
        rows.append(f"| {name} ({n} seed{'s' if n > 1 else ''}) | {eps} | {sig} | {pm(last, 'acc')} / {pm(ema, 'acc')} | "
                    f"{pm(last, 'max_psi')} / {pm(ema, 'max_psi')} | {pm(last, 'psi_pw')} / {pm(ema, 'psi_pw')} |")
    return "\n".join(rows)


def _finite(o):
    """JSON without Infinity: ε = ∞ is written as the string "inf"."""
    if isinstance(o, float) and math.isinf(o):
        return "inf" if o > 0 else "-inf"
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def report_line(name: str, r: dict) -> None:
    eps = r.get("dp", {}).get("epsilon_spent")
    print(f"{name:12s} last acc {r['last']['acc']:.2f} max ψ {r['last']['max_psi']:.2f} | "
          f"ema acc {r.get('ema', {}).get('acc', float('nan')):.2f} max ψ {r.get('ema', {}).get('max_psi', float('nan')):.2f}"
          + (f" | ε spent {eps:.3f}" if eps is not None else ""), flush=True)


SHARED = ("data", "limit", "budget", "pretrain", "search", "finetune", "fair_splits")  # dense + non-private runs


def schedule(args, spec, budget) -> dict:
    return {"data": spec, "limit": args.limit, "budget": budget, "pretrain": args.pretrain_epochs,
            "search": args.search_epochs, "finetune": args.finetune_epochs, "dp_grid": args.dp_grid,
            "dp_batch_size": args.dp_batch_size, "seeds": args.seeds, "ema_decay": args.ema_decay,
            **({} if args.ema_warmup else {"ema_warmup": False}),
            **({} if args.dp_kd_weight == 0.5 else {"dp_kd_weight": args.dp_kd_weight}),
            **({} if args.dp_dual_lr == 0.2 else {"dp_dual_lr": args.dp_dual_lr}),
            **({} if args.dp_clip == 1.0 else {"dp_clip": args.dp_clip}),
            **({"shared_dense": True} if getattr(args, "shared_dense", False) else {}),
            "fair_splits": args.fair_splits}


def state_digest(state: dict) -> str:
    """sha256 (16 hex) of a search state's tensors: which masks and starting weights a JSON's rows come from."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes() if torch.is_tensor(v) else repr(v).encode())
    return h.hexdigest()[:16]


def merge_disk(args, results: dict) -> dict:
    """``results`` plus the per-seed runs another process wrote to ``args.out`` meanwhile (same schedule and
    search state), re-aggregated: two processes may fill different rows or seeds of one JSON."""
    try:
        prev = json.loads(args.out.read_text())
    except (OSError, ValueError):
        return results
    if prev.get("search_state") != getattr(args, "state_digest", None) or not all(
            prev.get("schedule", {}).get(k) == v for k, v in schedule(args, None, None).items()
               if k in ("limit", "pretrain", "search", "finetune", "dp_grid", "dp_batch_size", "fair_splits")) or (
            prev.get("schedule", {}).get("dp_clip", 1.0) != getattr(args, "dp_clip", 1.0)):
        return results
    for name, row in prev.get("results", {}).items():
        if name == "dense":
            results.setdefault(name, row)
        elif name == "tuning":
            mine = results.setdefault("tuning", row)
            for k, v in row.get("runs", {}).items():
                mine["runs"].setdefault(k, v)
        elif isinstance(row, dict) and row.get("runs"):
            runs = (results.get(name) or {}).get("runs") or {}
            for seed, r in row["runs"].items():
                runs.setdefault(seed, r)
            results[name] = aggregate(runs)
    return results


def row_suffix(args) -> str:
    """The DP rows' name suffix for options off their defaults (``eps=8+augmult4``, ``eps=8+C30``)."""
    return ((f"+augmult{args.dp_augmult}" if args.dp_augmult > 1 else "")
            + (f"+C{args.dp_clip if isinstance(args.dp_clip, str) else format(args.dp_clip, 'g')}"
               if getattr(args, "dp_clip", 1.0) != 1.0 else ""))


def write(args, spec, bundle, budget, results, t0) -> None:
    results = merge_disk(args, results)
    base = results.get("non-private")
    goals = {}
    suffix = row_suffix(args)
    r8 = results.get(f"eps=8{suffix}")
    if base and r8 and "ema" in r8 and "last" in base:
        goals["by"] = "means over the seeds in both rows (the non-private compile exports its last iterate)"
        goals["eps8_ema_acc_within_3pt_of_non_private"] = r8["ema"]["acc"] >= base["last"]["acc"] - 3.0
        goals["eps8_ema_max_psi_le_non_private"] = r8["ema"]["max_psi"] <= base["last"]["max_psi"]
        goals["numbers"] = {"eps8_ema_acc": r8["ema"]["acc"], "non_private_acc": base["last"]["acc"],
                            "eps8_ema_max_psi": r8["ema"]["max_psi"], "non_private_max_psi": base["last"]["max_psi"],
                            "non_private_ema_max_psi": base.get("ema", {}).get("max_psi"),
                            "eps8_ema_max_psi_by_seed": r8["ema"].get("max_psi_by_seed"),
                            "non_private_max_psi_by_seed": base["last"].get("max_psi_by_seed")}
        rc, nc = results.get(f"eps=8{suffix}+ceag"), results.get("non-private+ceag")
        if rc and nc and "ema" in rc:
            goals["eps8_ceag_ema_max_psi_le_non_private_ceag"] = rc["ema"]["max_psi"] <= nc["last"]["max_psi"]
            goals["numbers"].update(non_private_ceag_acc=nc["last"]["acc"], non_private_ceag_max_psi=nc["last"]["max_psi"],
                                    non_private_ceag_max_psi_by_seed=nc["last"].get("max_psi_by_seed"))
        if rc and "ema" in rc:
            goals["eps8_ceag_ema_acc_within_3pt_of_non_private"] = rc["ema"]["acc"] >= base["last"]["acc"] - 3.0
            goals["eps8_ceag_ema_max_psi_le_non_private"] = rc["ema"]["max_psi"] <= base["last"]["max_psi"]
            goals["numbers"].update(eps8_ceag_ema_acc=rc["ema"]["acc"], eps8_ceag_ema_max_psi=rc["ema"]["max_psi"],
                                    eps8_ceag_ema_max_psi_by_seed=rc["ema"].get("max_psi_by_seed"),
                                    eps8_ceag_seeds=rc.get("seeds"))
    done = all(f"eps={e}{suffix}" in results for e in args.eps.split(",")) and base is not None
    order = (["dense", "non-private"] + [f"eps={e}{suffix}" for e in ("inf", "8", "3", "1")]
             + ["non-private+ceag", f"eps=8{suffix}+ceag"])
    results = {**{k: results[k] for k in order if k in results}, **{k: v for k, v in results.items() if k not in order}}
    out = {"benchmark": "dp", "complete": done, "data": spec, "target": bundle.target, "groups": bundle.group_names,
           "search_state": getattr(args, "state_digest", None),
           "model": "resnet8 (default)", "budget": budget, "schedule": schedule(args, spec, budget),
           "privacy_scope": "DP of the finetune w.r.t. the training split (--dp-phase finetune); the dense model "
                            "(pretrained non-privately on the same split) and the non-private mask search are treated "
                            "as public, so the released model is not end-to-end DP for these images",
           "machine": machine(), "results": results, "goals": goals,
           "recipe": {"dp_grid": args.dp_grid, "expected_batch": args.dp_batch_size, "clip_norm": args.dp_clip,
                      "optimizer": "SGD momentum 0.9 nesterov, cosine LR, KD from the dense teacher",
                      "kd_weight": args.dp_kd_weight,
                      "ema_decay": args.ema_decay,
                      "ema_warmup": args.ema_warmup,
                      "augmentation_multiplicity": "1 (rows 'eps=E+augmultK': K)",
                      "not_done": "a DP batch-size grid"},
           "note": "timings under load are upper bounds (loadavg recorded at each write)",
           "seconds_this_invocation": round(time.perf_counter() - t0, 1)}
    atomic_write_json(args.out, _finite(out))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())

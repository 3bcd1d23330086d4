"""What one ReLU *call* costs in 2PC, apart from its ReLUs → benchmarks/results/pi_calls.json.

The floor model of ``bench_pi.py`` (``0-ReLU latency + B × per-ReLU cost``, fitted through the dense and
the 0-ReLU export) is linear in the ReLU count only.  But SPU runs each ``Relu`` node of the graph as one
protocol invocation with its own rounds, and a partially linearized layer still needs its call: a gated
resnet8 keeps all 7 calls at any budget, while the line through dense (7 calls) and 0 ReLUs (0 calls)
spreads the 7 calls' fixed cost over 73,728 ReLUs.  Three exports with the same graph otherwise (resnet8,
random weights, pixel gates, lowered for PI) separate the two terms:

* ``zero``         — no ReLU (0 calls);
* ``7-in-1-layer`` — 7 ReLUs, all in the first ReLU layer (1 call);
* ``1-per-layer``  — 7 ReLUs, one in each of the 7 ReLU layers (7 calls).

Per-call cost = (1-per-layer − 7-in-1-layer) / 6 (same ReLUs, same gathers, 6 more calls).
Rounds: every model runs once per round in a fresh random order (``--rounds``, each a ``pi-bench``
run of ``--repeat`` timed inferences); mean and median over all timed runs.

Then ``call_aware_floor``: the rows of ``pi.json`` against a floor that counts calls too,
``0-ReLU latency + calls × per-call + B × per-ReLU'``, with per-ReLU' fitted through pi.json's dense and
0-ReLU runs after taking the dense model's 7 calls out (same statistic, mean or median).

Usage: python benchmarks/bench_pi_calls.py [--rounds 2] [--repeat 6] [--weights private,public]
       python benchmarks/bench_pi_calls.py --summarize     # recompute call_aware_floor only (no SPU run)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from bench_pi import build_onnx  # noqa: E402

from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.pi import bench as pib  # noqa: E402


def _keep(per_gate: list[int]):
    """A ``set_masks`` keeping the first ``per_gate[i]`` elements of gate i (fixed positions: cost does not
    depend on which)."""
    def set_masks(gates) -> None:
        for gate, k in zip(gates, per_gate):
            m = torch.zeros(gate.mask.numel())
            m[:k] = 1.0
            gate.set_mask(m.reshape(gate.mask.shape))
    return set_masks


MODELS = {  # name: (ReLUs kept, set_masks, ReLU calls)
    "zero": (0, _keep([0] * 7), 0),
    "7-in-1-layer": (7, _keep([7, 0, 0, 0, 0, 0, 0]), 1),
    "1-per-layer": (7, _keep([1] * 7), 7),
}


def call_aware_floor(calls_summary: dict, pi: dict) -> dict:
    """pi.json's rows against ``zero + calls × per_call + B × per_relu'`` (see the module docstring)."""
    out = {}
    for mode, cs in calls_summary.items():
        if mode not in pi.get("summary", {}):
            continue
        if min(cs["per_call_ms"].values()) <= 0:
            out[mode] = {"unresolved": f"per-call estimate {cs['per_call_ms']} is not positive: the run-to-run spread of "
                                       "this setting hides a cost of this size"}
            continue
        out[mode] = {}
        for st, key in (("mean", "mean_ms"), ("median", "median_ms")):
            s = pi["summary"][mode][st]
            per_call = cs["per_call_ms"][key]
            zero, dense = s["zero_relu_latency_ms"], s["dense_latency_ms"]
            dense_calls = pi["runs"][mode]["dense"]["onnx_ops"].get("Relu", 0)
            dense_relus = pi["runs"][mode]["dense"]["relus"]
            per_relu = (dense - zero - dense_calls * per_call) / dense_relus
            rows = {}
            for r in s["rows"]:
                if r["name"] in ("dense", "zero"):
                    continue
                calls = (pi["runs"][mode][r["name"]].get("onnx_ops") or {}).get("Relu", 0)
                floor = zero + calls * per_call + r["relus_onnx"] * per_relu
                rows[r["name"]] = {"relu_calls": calls, "relus": r["relus_onnx"], "latency_ms": r["latency_ms"],
                                   "linear_floor_ratio": r["ratio_to_floor"], "call_aware_floor_ms": round(floor, 1),
                                   "call_aware_ratio": round(r["latency_ms"] / floor, 3)}
            out[mode][st] = {"per_call_ms": per_call, "per_relu_us": round(1e3 * per_relu, 2), "zero_ms": zero,
                             "rows": rows}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=pib.DEFAULT_REPEAT)
    ap.add_argument("--weights", default="private,public")
    ap.add_argument("--out", default=str(ROOT / "results" / "pi_calls.json"))
    ap.add_argument("--pi-json", default=str(ROOT / "results" / "pi.json"))
    ap.add_argument("--summarize", action="store_true", help="recompute call_aware_floor from --out and --pi-json")
    a = ap.parse_args()
    if a.summarize:
        res = json.loads(Path(a.out).read_text())
        res["call_aware_floor"] = call_aware_floor(res["summary"], json.loads(Path(a.pi_json).read_text()))
        atomic_write_json(Path(a.out), res)
        print(json.dumps(res["call_aware_floor"], indent=1))
        return 0
    if pib.venv_python() is None:
        print("building the SPU venv (relucomp pi-bench --setup)...", flush=True)
        pib.setup_venv()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="relucomp-bench-pi-calls-"))
    built = {}
    for name, (relus, set_masks, calls) in MODELS.items():
        built[name] = build_onnx(work / f"{name}.onnx", relus, "pixel", "pi", set_masks=set_masks)
        print(f"built {name}: {built[name]['relus_onnx']} ReLUs, {calls} Relu calls, forms {built[name]['forms']}",
              flush=True)
    rng = random.Random(0)
    res: dict = {"benchmark": "per-call cost of a ReLU layer in 2PC (issue 15: what the linear floor leaves out)",
                 "setup": {"protocol": "SPU 0.9.5 Cheetah (2PC), FM64, 2 processes on 127.0.0.1", "batch": 1,
                           "model": "resnet8, random weights, pixel gates lowered for PI (gather form)",
                           "rounds": a.rounds, "repeat_per_round": a.repeat,
                           "method": "every round runs each model once (one pi-bench run of `repeat` timed "
                                     "inferences) in a fresh random order; statistics over all timed runs"},
                 "models": {n: {"relus": r, "relu_calls": c, "forms": built[n]["forms"]} for n, (r, _, c) in MODELS.items()},
                 "runs": {}, "summary": {}}
    for mode in a.weights.split(","):
        samples = {n: [] for n in MODELS}
        loads = []
        for _ in range(a.rounds):
            order = list(MODELS)
            rng.shuffle(order)
            for name in order:
                loads.append(os.getloadavg()[0])
                r = pib.pi_bench(built[name]["onnx"], protocol="cheetah", repeat=a.repeat, weights=mode)
                samples[name] += list(r["latency_runs_s"])
                print(f"[{mode}] {name}: " + ", ".join(f"{v * 1e3:.0f}" for v in r["latency_runs_s"]) + " ms", flush=True)
        stats = {n: {"mean_ms": round(1e3 * float(np.mean(v)), 1), "median_ms": round(1e3 * float(np.median(v)), 1),
                     "iqr_ms": [round(1e3 * float(q), 1) for q in np.percentile(v, [25, 75])], "n": len(v)}
                 for n, v in samples.items()}
        per_call = {st: round((stats["1-per-layer"][st] - stats["7-in-1-layer"][st]) / 6, 2) for st in ("mean_ms", "median_ms")}
        res["runs"][mode] = {n: [round(1e3 * x, 1) for x in v] for n, v in samples.items()}
        res["summary"][mode] = {"models": stats, "per_call_ms": per_call,
                                "first_call_plus_7_relus_ms": {st: round(stats["7-in-1-layer"][st] - stats["zero"][st], 2)
                                                               for st in ("mean_ms", "median_ms")},
                                "loadavg_1min": {"mean": round(float(np.mean(loads)), 2), "max": round(max(loads), 2)}}
        print(f"[{mode}] per call: {per_call}", flush=True)
    if Path(a.pi_json).exists():
        res["call_aware_floor"] = call_aware_floor(res["summary"], json.loads(Path(a.pi_json).read_text()))
    res["machine"] = pib.machine_info()
    res["wall_s"] = round(time.time() - t_start, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, res)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

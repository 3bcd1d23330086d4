"""What the linear replacements cost in 2PC (issue 11) → benchmarks/results/affine_pi.json.

A linearized ReLU becomes ``s·x + b`` per channel (``--replacement affine``) instead of the identity.
Where the fold passes cannot absorb it (pixel gates: a channel that is partly kept, a zero-padded
consumer conv and a shift) it stays an elementwise ``Mul`` + ``Add`` by constants in the exported graph.
Neither adds a comparison; this benchmark measures what the ``Mul`` + ``Add`` cost under SPU Cheetah.

resnet8 (73,728 ReLUs), pixel gates, the same random exact mask at ``--budget`` (default 18,432) exported
twice by the PI-ready lowering: ``identity`` (no replacement) and ``affine`` (random per-channel
``s`` ∈ [0.5, 1.5], ``b`` ∈ [−0.5, 0.5]: nothing folds to the identity).  Both graphs are checked
(onnxruntime against torch, ReLU count from the graph = the budget).  ``pi-bench`` runs them
**interleaved** (``--rounds`` rounds of identity, affine, each ``--repeat`` timed runs after a warm-up) with
public and private weights; reported: mean and median of all timed runs per export, their ratio, bytes.

Usage: python benchmarks/bench_affine_pi.py [--budget 18432] [--rounds 2] [--repeat 3] [--weights public,private]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pi import exact_masks  # noqa: E402
from relucomp.api import build_gated, lowering_passes  # noqa: E402
from relucomp.export import ort_run  # noqa: E402
from relucomp.infra import PassManager  # noqa: E402
from relucomp.models import load_model  # noqa: E402
from relucomp.passes.insert_gates import gates_of  # noqa: E402
from relucomp.pi import bench as pib  # noqa: E402
from relucomp.verify import onnx_relu_count  # noqa: E402

ROOT = Path(__file__).resolve().parent


def build(out: Path, budget: int, replacement: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = load_model("resnet8", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    gm, _ = build_gated(model, x, granularity="pixel", replacement=replacement)
    exact_masks(gm, budget, "pixel", seed)   # the same mask for both variants (same seed, same gate order)
    if replacement == "affine":
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for gate in gates_of(gm).values():
                gate.rep_scale.copy_(0.5 + torch.rand(gate.rep_scale.shape, generator=g))
                gate.rep_shift.copy_(torch.rand(gate.rep_shift.shape, generator=g) - 0.5)
    gm.eval()
    with torch.no_grad():
        ref = gm(x)
    low = PassManager(lowering_passes(x, gate_form="pi"), calibration=x).run(gm).gm
    with torch.no_grad():
        assert float((low(x) - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    torch.onnx.export(low, (x[:1],), str(out), dynamo=False, input_names=["input"], output_names=["logits"],
                      opset_version=18)
    relus = onnx_relu_count(str(out))["relus"]
    assert relus == budget, (relus, budget)
    xv = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = low(xv).numpy()
    diff = float(np.abs(ort_run(out, xv.numpy()) - want).max())
    assert diff < 1e-3 * max(1.0, float(np.abs(want).max())), diff
    ops: dict[str, int] = {}
    for n in onnx.load(str(out)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"onnx": str(out), "relus_onnx": relus, "ort_vs_torch_max_abs": diff, "ops": ops}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=int, default=18_432)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--weights", default="public,private")
    ap.add_argument("--out", default=str(ROOT / "results" / "affine_pi.json"))
    a = ap.parse_args()
    if pib.venv_python() is None:
        print("the SPU venv is missing: run `relucomp pi-bench --setup` first", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="relucomp-affine-pi-"))
    built = {v: build(work / f"{v}.onnx", a.budget, v) for v in ("identity", "affine")}
    for v, b in built.items():
        print(f"{v}: {b['relus_onnx']:,} ReLUs, Mul {b['ops'].get('Mul', 0)}, Add {b['ops'].get('Add', 0)}", flush=True)
    res = {"benchmark": "affine_pi", "model": "resnet8", "granularity": "pixel", "budget": a.budget,
           "protocol": "cheetah", "rounds": a.rounds, "repeat_per_round": a.repeat,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
           "exports": {v: {k: b[k] for k in ("relus_onnx", "ort_vs_torch_max_abs", "ops")} for v, b in built.items()},
           "results": {}}
    t0 = time.time()
    for mode in a.weights.split(","):
        runs = {v: [] for v in built}
        sent = {v: [] for v in built}
        loads = []
        for r in range(a.rounds):
            for v, b in built.items():  # interleaved: identity, affine, identity, affine, ...
                loads.append(os.getloadavg()[0])
                out = pib.pi_bench(b["onnx"], protocol="cheetah", repeat=a.repeat, weights=mode)
                runs[v] += out["latency_runs_s"]
                sent[v].append(out["bytes"])
                print(f"[{mode}] round {r + 1} {v}: " + ", ".join(f"{t:.2f}" for t in out["latency_runs_s"]) + " s",
                      flush=True)
        row = {v: {"mean_s": float(np.mean(t)), "median_s": float(np.median(t)),
                   "iqr_s": float(np.subtract(*np.percentile(t, [75, 25]))), "runs_s": t,
                   "mb_sent": float(np.median(sent[v])) / 1e6} for v, t in runs.items()}
        row["affine_over_identity"] = {"mean": row["affine"]["mean_s"] / row["identity"]["mean_s"],
                                       "median": row["affine"]["median_s"] / row["identity"]["median_s"],
                                       "bytes": row["affine"]["mb_sent"] / row["identity"]["mb_sent"]}
        row["loadavg_1min"] = [round(min(loads), 2), round(max(loads), 2)]
        res["results"][mode] = row
        print(json.dumps({mode: row["affine_over_identity"]}), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

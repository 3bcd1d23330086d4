"""Scale-out benchmark (issue 16) → benchmarks/results/scale.json.

Images per second of a relucomp training step — the gated model (pixel gates
open, as at the start of the mask search; weights and gates trained) through
:func:`relucomp.train.train_loop` with the in-memory loader — for resnet8 and
resnet18 on 1 process and on 2 CPU processes (``torchrun``, gloo, DDP,
global-batch BatchNorm).  The global batch is the same for both (each of the 2
processes computes half of it).  Repeats are interleaved (1, 2, 1, 2, ...);
each repeat reports the median step time after a warm-up; the JSON holds
the median and IQR over repeats, the machine and its load average before and
after every repeat.  A second table compares the training loaders on one
process (in-memory ``BatchLoader`` vs ``DataLoader`` with worker processes).

GPU rows (CUDA with and without AMP, ResNet18 on CIFAR-10 at 15k ReLUs) are
written as "not measured" unless a CUDA device is present.

The machine is shared with other jobs: timings are upper bounds (the load is recorded).

Usage: python benchmarks/bench_scale.py [--repeats 3] [--steps 6] [--models resnet8,resnet18]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "scale.json"
BATCH = {"resnet8": 128, "resnet18": 32}


def worker(model_name: str, batch: int, steps: int, result: Path) -> None:
    """One measurement (run by 1 process, or by every rank under torchrun): median seconds per step."""
    import torch

    torch.set_num_threads(1)
    from relucomp import distributed
    from relucomp.data.base import GroupedDataset
    from relucomp.loaders import BatchLoader
    from relucomp.models import build_model
    from relucomp.pipelines import build_gated
    from relucomp.train import ce_kd_step, make_optimizer, train_loop

    distributed.setup("cpu", batch_size=batch)
    torch.manual_seed(0)
    n = batch * (steps + 2)
    ds = GroupedDataset(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)),
                        torch.zeros(n, dtype=torch.long), group_names=["all"], class_names=[str(i) for i in range(10)],
                        train=True)
    gm, _ = build_gated(build_model(model_name), torch.randn(2, 3, 32, 32), granularity="pixel", replacement="affine")
    loader = BatchLoader(ds, batch_size=batch, shuffle=True, augment=True, seed=0, drop_last=True)
    opt = make_optimizer(gm.parameters(), lr=0.01)
    stamps: list[float] = []
    train_loop(gm, loader, epochs=1, optimizer=opt, step_fn=ce_kd_step(None), desc="bench",
               after_step=lambda s: stamps.append(time.perf_counter()))
    dts = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # first two steps: warm-up
    if distributed.is_main():
        result.write_text(json.dumps({"step_seconds": statistics.median(dts), "steps": len(dts),
                                      "world": distributed.world_size()}))
    distributed.barrier()
    distributed.teardown()


def loader_worker(workers: int, result: Path) -> None:
    """Seconds to draw one epoch of augmented training batches (synthetic data set, batch 128)."""
    import torch

    torch.set_num_threads(1)
    from relucomp.data import load_data
    from relucomp.loaders import train_loader

    ds = load_data("synthetic", seed=0).train
    ld = train_loader(ds, batch_size=128, seed=0, workers=workers)
    for _ in ld:  # warm-up (worker start-up for the DataLoader)
        break
    t0 = time.perf_counter()
    n = sum(int(x.shape[0]) for x, *_ in ld)
    dt = time.perf_counter() - t0
    result.write_text(json.dumps({"seconds": dt, "images": n}))


def _measure(cmd: list[str], result: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    result.unlink(missing_ok=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return json.loads(result.read_text())


def _stats(vals: list[float]) -> dict:
    vals = sorted(vals)
    q = statistics.quantiles(vals, n=4) if len(vals) >= 2 else [vals[0]] * 3
    return {"median": round(statistics.median(vals), 2), "iqr": round(q[2] - q[0], 2),
            "values": [round(v, 2) for v in vals]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--models", default="resnet8,resnet18")
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "BATCH", "STEPS", "RESULT"))
    ap.add_argument("--loader-worker", nargs=2, metavar=("WORKERS", "RESULT"))
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]), int(a.worker[2]), Path(a.worker[3]))
    if a.loader_worker:
        return loader_worker(int(a.loader_worker[0]), Path(a.loader_worker[1]))

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_core import machine

    here = Path(__file__).resolve()
    tmp = OUT.parent / ".scale-result.json"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows, runs = [], []
    for model in a.models.split(","):
        batch = BATCH.get(model, 64)
        per: dict[int, list[float]] = {1: [], 2: []}
        for rep in range(a.repeats):
            for nproc in (1, 2):  # interleaved
                args = [str(here), "--worker", model, str(batch), str(a.steps), str(tmp)]
                cmd = ([sys.executable, *args] if nproc == 1 else
                       [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])
                load0 = os.getloadavg()
                r = _measure(cmd, tmp)
                ips = batch / r["step_seconds"]
                per[nproc].append(ips)
                runs.append({"model": model, "processes": nproc, "repeat": rep, "images_per_s": round(ips, 2),
                             "step_seconds": round(r["step_seconds"], 4), "load_before": load0,
                             "load_after": os.getloadavg()})
                print(f"{model} ×{nproc} rep {rep}: {ips:.1f} img/s (load {load0[0]:.1f})", flush=True)
        s1, s2 = _stats(per[1]), _stats(per[2])
        rows.append({"model": model, "device": "cpu", "global_batch": batch, "amp": "none",
                     "images_per_s_1proc": s1, "images_per_s_2proc": s2,
                     "speedup_2proc": round(s2["median"] / s1["median"], 3)})
    loaders = {}
    for workers in (0, 2):
        vals = []
        for rep in range(a.repeats):
            r = _measure([sys.executable, str(here), "--loader-worker", str(workers), str(tmp)], tmp)
            vals.append(r["images"] / r["seconds"])
        loaders["in-memory BatchLoader" if workers == 0 else f"DataLoader, {workers} workers"] = _stats(vals)
    tmp.unlink(missing_ok=True)
    gpu = torch.cuda.is_available()
    doc = {
        "benchmark": "scale", "issue": 16,
        "what": "images/s of a gated training step (pixel gates open, weights + gates trained, in-memory loader, "
                "train_loop) on 1 process vs 2 CPU processes (torchrun, gloo, DDP, global-batch BatchNorm); same "
                "global batch; median and IQR over interleaved repeats (each repeat: median step time after 2 warm-up "
                "steps)",
        "machine": {**machine(), "torch_threads_per_process": 1, "load_average_at_end": os.getloadavg(),
                    "note": "2-core machine shared with other jobs while measured: timings are upper bounds, and 2 "
                            "processes compete with the other jobs for the same 2 cores"},
        "rows": rows,
        "gpu_rows": [] if gpu else [
            {"model": m, "device": "cuda", "amp": amp, "status": "not measured: no GPU lent to this task"}
            for m in ("resnet8", "resnet18") for amp in ("none", "bf16")] + [
            {"model": "resnet18", "data": "cifar10 folders", "relu_budget": 15000, "reference_snl": 88.43,
             "status": "not measured: no GPU lent to this task"}],
        "loaders_1proc_images_per_s": loaders,
        "runs": runs,
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({r["model"]: (r["images_per_s_1proc"]["median"], r["images_per_s_2proc"]["median"])
                      for r in rows}))


if __name__ == "__main__":
    main()

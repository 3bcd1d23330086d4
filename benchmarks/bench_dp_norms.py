"""Per-sample gradient norms under DP (issue 13) → benchmarks/results/dp_grad_norms.json.

Where the clipping norm C sits in the distribution of per-sample gradient norms of the DP loss
(CE + KD at weight 0.5, T = 4) at the DP finetune's starting weights: the dense model and mask search
of ``bench_dp.py`` (its cached search state; run ``bench_dp.py`` first), measured on 512 images of the
validation split by ``relucomp.dp.heldout_grad_norms`` (what every DP compile reports as
``report.json["dp"]["heldout_grad_norms"]``).  One short DP compile (ε = ∞, one epoch) reads it out.

Usage: python benchmarks/bench_dp_norms.py [--clips 1,3,8,30,100]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dp import OUT as DP_OUT, UTK_CANDIDATES, machine, state_digest  # noqa: E402
from relucomp.api import compile as rc_compile  # noqa: E402
from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.cache import cache_root  # noqa: E402
from relucomp.data import load_data  # noqa: E402

OUT = DP_OUT.parent / "dp_grad_norms.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=12000)
    ap.add_argument("--clips", default="1,3,8,30,100", help="clipping norms whose quantile position is reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    utk = next((p for p in UTK_CANDIDATES if p.exists()), None)
    if utk is None:
        sys.exit("needs UTKFace under ../shared/data (as bench_dp.py)")
    state_path = cache_root() / "bench_dp" / f"search-4000-8-1-{args.limit}.pt"
    if not state_path.exists():
        sys.exit(f"no cached search state at {state_path}: run benchmarks/bench_dp.py first")
    state = torch.load(state_path, weights_only=True)
    bundle = load_data(f"utkface:{utk}", limit=args.limit, target="race", fair_groups="race")
    t0 = time.perf_counter()
    res = rc_compile(None, bundle, relu_budget=4000, pretrain_epochs=8, search_epochs=1, finetune_epochs=1,
                     progress=False, fair_groups=bundle.group_attribute, fair_method="nft", export=False,
                     batch_size=128, config={"finetune": {"kd_weight": 0.5}}, search_state=state,
                     dp_epsilon=float("inf"), dp_batch_size=512, dp_max_grad_norm=1.0)
    hn = res.report["dp"]["heldout_grad_norms"]
    q = hn["quantiles"]
    pts = sorted((v, k) for k, v in q.items())

    def position(c: float) -> str:
        below = [k for v, k in pts if v <= c]
        above = [k for v, k in pts if v > c]
        return f"between {below[-1]} and {above[0]}" if below and above else (f"above {below[-1]}" if below else f"below {above[0]}")

    out = {"benchmark": "dp_grad_norms", "search_state": state_digest(state), "data": f"utkface:{utk}",
           "limit": args.limit, "budget": 4000, "loss": "0.5·CE + 0.5·T²·KL(dense teacher), T = 4, per image",
           "at": "the DP finetune's starting weights (bench_dp.py's shared dense model and mask search)",
           "heldout_grad_norms": hn,
           "clip_positions": {f"C={float(c):g}": position(float(c)) for c in args.clips.split(",")},
           "machine": machine(), "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(args.out, out)
    print(q, out["clip_positions"])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the embedded default model and write it into the package.

Produces ``relucomp/weights/resnet8_synthetic.pt`` (a plain ``state_dict`` of
float32 tensors, loaded with ``torch.load(weights_only=True)``) and
``relucomp/weights/resnet8_synthetic.json`` (its sha256, the fingerprint of the
training/test split it was trained on, and its accuracy).  The synthetic data
generator and the split are deterministic, so running this script again gives
the same data; the weights themselves may differ in the last bits across torch
versions / thread counts, which is why the checksum is recorded next to them.

Usage: python scripts/make_default_weights.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from relucomp.api import pretrain
from relucomp.data import load_data
from relucomp.loaders import BatchLoader
from relucomp.models import load_model
from relucomp.recipe import DEFAULT_WEIGHTS, bundle_fingerprint, file_sha256
from relucomp.train import evaluate, progress_bar


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = DEFAULT_WEIGHTS
    bundle = load_data("synthetic", seed=spec["seed"])
    torch.manual_seed(spec["seed"])
    model = load_model(spec["model"], num_classes=bundle.num_classes)
    t0 = time.perf_counter()
    with progress_bar(True) as prog:
        model, info = pretrain(model, bundle, epochs=args.epochs, lr=0.05, batch_size=128, seed=spec["seed"],
                               progress=prog, cache_path=None)
    seconds = time.perf_counter() - t0
    model.eval()
    acc = {s: evaluate(model, BatchLoader(getattr(bundle, s), batch_size=512))["acc"] for s in ("val", "test")}
    out = Path(__file__).resolve().parents[1] / "relucomp" / "weights"
    out.mkdir(exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / spec["file"])
    meta = {"model": spec["model"], "data": "synthetic", "seed": spec["seed"], "epochs": args.epochs,
            "lr": 0.05, "batch_size": 128, "file": spec["file"], "sha256": file_sha256(out / spec["file"]),
            "data_fingerprint": bundle_fingerprint(bundle), "accuracy": acc, "train_seconds": round(seconds, 1),
            "torch": torch.__version__}
    (out / spec["meta"]).write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()

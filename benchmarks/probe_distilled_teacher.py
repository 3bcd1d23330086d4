"""Probe (issue 12): does a resnet8 robust teacher distilled from a wider robust teacher lie above the
CA/AdvA line of resnet8's own robust teachers? → benchmarks/results/robust_probe_rslad.json

The robust compile's student keeps about its starting teacher's CA and AdvA (docs/robust-probes.md#frontier), and
resnet8's two robust teachers (HAT's and TRADES β 6, both adversarially finetuned from the dense model) span one
CA/AdvA trade-off. A teacher above that line is the precondition for a robust compile above the frontier. This
probe trains one more resnet8 teacher on one of the distillation objectives of :data:`LOSSES` (``--loss``: RSLAD,
Zi et al., ICCV'21; TRADES with the wide teacher's output as the robust term's target; ARD's form) with ``t`` =
the 2× wider resnet8's TRADES β 6 teacher (cached by the ``robust_w2*.json`` runs), from the same dense resnet8,
same epochs, learning rate and schedule as the teachers it is compared with — and measures all of them on held-out images that none of the
benchmark's splits uses: CIFAR-10 training-folder images outside the seed's 3,000 (deduplicated by pixels), so the
benchmark's validation and test images are not spent.

    python benchmarks/probe_distilled_teacher.py --seed 0 --loss rslad        # and --loss trades-kd, --seed 1

Every model comes from the relucomp cache except the distilled teacher (trained here: ≈ 3 min on 2 cores, 5–6 min a run with the measurements).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.data.load import load_data  # noqa: E402
from relucomp.robustness import Normalized, pgd_attack  # noqa: E402
from relucomp.train import make_optimizer, train_loop  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "robust_probe_rslad.json"
W2 = "benchmarks/wide_models.py:resnet8_w2"


def _bench_robust():
    spec = importlib.util.spec_from_file_location("bench_robust", ROOT / "benchmarks" / "bench_robust.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def teachers(seed: int, model: str | None):
    """The data bundle and the robust_teacher stage's output for ``model`` (None: resnet8) at bench_robust.py's
    defaults — the same cache keys as its runs, so nothing is trained when they ran."""
    br = _bench_robust()
    return br.robust_teachers(br.parse(["--seed", str(seed)]), model)


def heldout(bundle, n: int, seed: int):
    """``n`` CIFAR-10 training-folder images that are in none of ``bundle``'s splits (pixel hashes)."""
    used = {hashlib.sha1(img.numpy().tobytes()).digest()
            for ds in bundle.splits.values() for img in ds.images}
    big = load_data(bundle.spec, seed=seed + 1000, limit=5 * n)
    imgs, ys = [], []
    for ds in (big.train, big.val, big.test):
        for img, y in zip(ds.images, ds.labels):
            if hashlib.sha1(img.numpy().tobytes()).digest() not in used:
                imgs.append(img)
                ys.append(int(y))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(imgs), generator=g)[:n]
    return torch.stack([imgs[i] for i in idx]), torch.tensor([ys[i] for i in idx]), len(used)


@torch.no_grad()
def _acc(model, x01, y, batch=250):
    return float(sum((model(x01[i:i + batch]).argmax(1) == y[i:i + batch]).sum() for i in range(0, len(y), batch)))


def measure(models: dict, images, y, mean, std) -> dict:
    x01 = images.float() / 255
    out = {}
    for name, m in models.items():
        w = Normalized(copy.deepcopy(m).eval(), mean, std).eval()
        ca = _acc(w, x01, y)
        g = torch.Generator().manual_seed(0)
        adv = torch.cat([pgd_attack(w, x01[i:i + 250], y[i:i + 250], epsilon=8 / 255, step=2 / 255, steps=10,
                                    random_start=True, generator=g) for i in range(0, len(y), 250)])
        out[name] = {"ca": round(100 * ca / len(y), 2), "adva": round(100 * _acc(w, adv, y) / len(y), 2)}
        print(name, out[name], flush=True)
    return out


#: the distillation objectives probed (``--loss``); ``t`` = the wide teacher's clean output, ``x'`` the attack on the
#: robust term:
#:   rslad      (1 − α)·KL(s(x) ‖ t(x)) + α·KL(s(x') ‖ t(x)), α = 5/6 (Zi et al. 2021)
#:   trades-kd  CE(s(x), y) + β·KL(s(x') ‖ t(x)), β = 6 — TRADES with the wide teacher's output as the target of the
#:              robust term instead of the student's own
#:   ard        (1 − α)·CE(s(x), y) + α·T²·KL(s(x')/T ‖ t(x)/T), α = 0.9, T = 4 (Goldblum et al. 2020's form)
LOSSES = ("rslad", "trades-kd", "ard")


def distil_teacher(student, teacher, loader, *, epochs: int, lr: float, mean, std, epsilon: float, step: float,
          attack_steps: int, loss: str = "rslad"):
    """The student's adversarial (and clean) outputs distilled to the wide teacher's clean soft labels."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    teacher = teacher.eval()

    temp = 4.0 if loss == "ard" else 1.0

    def kl(logits, target_p):
        return F.kl_div(F.log_softmax(logits / temp, 1), target_p, reduction="batchmean")

    def step_fn(model, x, y, g):
        with torch.no_grad():
            tp = F.softmax(teacher(x) / temp, 1)
        x01 = (x * s + m).clamp(0, 1)
        wrapped = Normalized(model, mean, std)
        x_adv = pgd_attack(wrapped, x01, tp, epsilon=epsilon, step=step, steps=attack_steps, random_start=True,
                           loss=kl)
        model.train()
        logits = model(x)
        robust = kl(model((x_adv - m) / s), tp)
        if loss == "rslad":
            out = (1 / 6) * kl(logits, tp) + (5 / 6) * robust
        elif loss == "trades-kd":
            out = F.cross_entropy(logits, y) + 6.0 * robust
        else:
            out = 0.1 * F.cross_entropy(logits, y) + 0.9 * temp ** 2 * robust
        return out, logits

    opt = make_optimizer(student.parameters(), lr=lr)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(1.0, k / total))))
    hist = train_loop(student, loader, epochs=epochs, optimizer=opt, step_fn=step_fn, desc=f"{loss} teacher",
                      after_step=lambda k: sched.step())
    return student.eval(), hist


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loss", choices=LOSSES, default="rslad")
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    st8, cfg = teachers(a.seed, None)
    rt8 = st8["robust_teacher"]
    stw, _ = teachers(a.seed, W2)
    rtw = stw["robust_teacher"]
    bundle = st8["data"].bundle
    images, y, n_used = heldout(bundle, a.heldout, a.seed)
    mean, std = tuple(bundle.train.mean), tuple(bundle.train.std)
    from relucomp.stages.robust_teacher import schedule, teacher_lrs, train_settings

    epochs, steps = schedule(cfg)
    lr = teacher_lrs(cfg)[1]
    s = train_settings(st8)
    torch.manual_seed(a.seed)
    student = copy.deepcopy(rt8.plain)
    for p in student.parameters():
        p.requires_grad_(True)
    t1 = time.perf_counter()
    student, hist = distil_teacher(student, rtw.adversarial, st8["data"].train, epochs=epochs, lr=lr, mean=mean, std=std,
                          epsilon=s.epsilon, step=s.step_size, attack_steps=steps, loss=a.loss)
    train_s = time.perf_counter() - t1
    models = {"resnet8 dense": rt8.plain, "resnet8 HAT teacher (perturbed BN)": st8["pretrain"].teacher,
              "resnet8 HAT teacher (clean BN)": rt8.clean, "resnet8 TRADES b6 teacher (student start)": rt8.adversarial,
              f"resnet8 {a.loss} teacher from the w2 b6 teacher": student,
              "w2 TRADES b6 teacher (RSLAD's teacher)": rtw.adversarial, "w2 dense": rtw.plain}
    res = measure(models, images, y, mean, std)
    doc = json.loads(a.out.read_text()) if a.out.exists() else {"runs": []}
    doc.update({"benchmark": "robust_probe_rslad", "note": __doc__.split("\n\n")[0],
                "heldout": {"images": len(y), "from": "CIFAR-10 training folder, none in the seed's 3,000 (pixel hashes)",
                            "excluded": n_used},
                "attack": "PGD-10 L-inf 8/255, step 2/255, random start, pixel space",
                "machine": _bench_robust().machine() | {"load_average_at_end": os.getloadavg()}})
    doc["runs"] = [r for r in doc["runs"] if (r["seed"], r["loss"]) != (a.seed, a.loss)] + [{
        "seed": a.seed, "loss": a.loss, "models": res, "rslad": {"epochs": epochs, "lr": lr, "attack_steps": steps,
                                               "epsilon": s.epsilon, "train_seconds": round(train_s, 1),
                                               "history": [{k: (round(v, 4) if isinstance(v, float) else v)
                                                            for k, v in h.items()} for h in hist]},
        "seconds": round(time.perf_counter() - t0, 1)}]
    atomic_write_json(a.out, doc)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

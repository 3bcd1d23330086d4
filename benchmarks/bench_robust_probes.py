"""Method probes for the robust compile (issue 12), on the validation split → benchmarks/results/robust_val_probes.json.

The robust compile keeps its TRADES teacher's clean accuracy (CA); these probes ask whether a change of method
moves the CA / AdvA frontier, on the 250 validation images of ``bench_robust.py``'s schedule (resnet8, a
stratified ``--limit 3000`` CIFAR-10 subset, 20 pretraining + 20 teacher epochs, 3 search + 4 finetune epochs,
10 % budget), all models of a seed evaluated on the same images in one call:

* ``plain``: the plain compile (reference);
* ``robust``: the robust compile as shipped (student starts from the robust teacher);
* ``teacher_interp``: the dense model and the TRADES teacher interpolated in weight space,
  θ = α·θ_teacher + (1 − α)·θ_dense (model soups / WiSE-FT, Wortsman et al. 2022; Croce et al. 2023), α grid;
* ``student_soup``: the robust student and a copy of it finetuned on the plain objective (CE + KD from the dense
  model, ``finetune_epochs``) interpolated the same way (same masks), clean BN branch, BN re-estimated;
* ``dense_init``: the robust compile with the student starting from the dense model instead of the teacher.

``--probe kd-natural`` runs another set instead (→ ``robust_val_kdnat.json``): the robust compile with the
natural-perturbation (AugMix) KD term weighted 1 (as shipped), 3 and 5 (``robustness.kd_natural``), beside the
plain compile — does the student keep more of its teacher's NPA?

``--probe jsd --jsd-weight W`` (→ ``robust_val_jsd.json``): the robust compile whose teacher was trained with AugMix's
JSD consistency weighted W (``robustness.jsd_weight``), beside the plain compile.

``--probe teacher-branches`` (→ ``robust_val_teachers.json``): no robust compile — the robust teachers of today's
defaults (JSD weight 48), the one-BN teacher and both branches of the dual-BN teacher (``clean_teacher =
"dual"``: ``perturbed`` teaches the student's AugMix and adversarial terms and is its starting point, ``clean``
teaches its clean term), beside the dense model and the plain compile.

Every other probe's teacher uses JSD weight 12 and one BatchNorm (``clean_teacher = "robust"``): the defaults when
they were run (48 and ``"dual"`` since), pinned here so that each file is reproduced by its command; ``--probe
jsd`` sets the weight.  Every probe uses AugMix's own ops (``robustness.augmix_ops = "augmix"``, the default until
session 16; PRIME's since), pinned too.

``--probe student-jsd --student-jsd W1,W2`` (→ ``robust_val_sjsd.json``): the robust compile with AugMix's JSD
consistency in the student's step too, weighted W (``robustness.student_jsd``; shipped 0 = off, always run as the
reference), beside the plain compile — the compile keeps about half its teacher's NPA gain; does the student's own
consistency term keep more?

``--probe weights`` (→ ``robust_val_weights.json``; today's defaults: JSD weight 48, dual-BN teacher): the student's
weight average instead of its last weights (``export.weights = "ema"``, the finetune's EMA, decay
``finetune.ema_decay``) and a finetune twice as long (``--long-finetune``, default 8 epochs), each for the robust
and the plain compile — weight averaging is the adversarial-training literature's most reliable lever on both clean
and robust accuracy (Gowal et al. 2020, Rebuffi et al. 2021: EMA of the weights; Rice et al. 2020: against robust
overfitting), and the robust student stays near its teacher in 4 epochs.

Usage: python benchmarks/bench_robust_probes.py --seed 0   (seeds may run as parallel processes; one JSON)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

from relucomp.passes.finetune import FinetunePass

from relucomp.api import resolve_config, validate
from relucomp.atomic import atomic_write_json
from relucomp.config import robustness_settings
from relucomp.infra import PassManager
from relucomp.recipe import finetune_lr
from relucomp.robustness import evaluate_robustness
from relucomp.stages import STAGES, Hooks, Stage
from relucomp.stages import run as run_stages
from relucomp.stages.robust_bn import collapse_to

OUT = Path(__file__).parent / "results" / "robust_val_probes.json"
DATA = Path("/work/shared/data/cifar10-jpeg")
UPTO = ("data", "model", "pretrain", "robust_teacher", "evaluate_dense", "gates", "dual_bn", "search", "prune",
        "finetune")


def interpolate(model, a: dict, b: dict, alpha: float):
    """``model`` (a copy) with α·a + (1 − α)·b for every floating tensor (integer buffers from ``a``)."""
    m = copy.deepcopy(model)
    m.load_state_dict({k: alpha * a[k] + (1 - alpha) * b[k] if a[k].is_floating_point() else a[k] for k in a})
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe", default="methods", choices=("methods", "kd-natural", "jsd", "student-jsd",
                                                                 "teacher-branches", "weights"))
    ap.add_argument("--long-finetune", type=int, default=8, help="--probe weights: the longer finetune's epochs")
    ap.add_argument("--jsd-weight", type=float, default=24.0, help="--probe jsd: the teacher's JSD weight")
    ap.add_argument("--student-jsd", default="12,48", help="--probe student-jsd: the student's JSD weights")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.out = a.out or str({"methods": OUT, "kd-natural": OUT.with_name("robust_val_kdnat.json"),
                          "jsd": OUT.with_name("robust_val_jsd.json"),
                          "student-jsd": OUT.with_name("robust_val_sjsd.json"),
                          "teacher-branches": OUT.with_name("robust_val_teachers.json"),
                          "weights": OUT.with_name("robust_val_weights.json")}[a.probe])
    torch.set_num_threads(a.threads)
    if not Path(a.data).is_dir():
        sys.exit(f"no CIFAR-10 folders at {a.data} (pass --data)")
    load0, t_all = os.getloadavg(), time.perf_counter()
    base = {"model.spec": "resnet8", "data.spec": f"cifar10:{a.data}", "relu_budget": a.budget, "limit": 3000,
            "pretrain_epochs": 20, "search_epochs": 3, "finetune_epochs": 4, "export": False, "progress": False,
            "eval_robustness": True, "corruptions": "all", "severities": "1,2,3,4,5", "robustness_samples": 500,
            "robustness_split": "val", "seed": a.seed}
    robust = {"robust": True, "robust_teacher_epochs": 20, "trades_beta": 6.0, "train_attack_steps": 2,
              "robustness.jsd_weight": a.jsd_weight if a.probe == "jsd" else 12.0,
              "robustness.clean_teacher": "robust", "robustness.augmix_ops": "augmix",
              "robustness.helper_weight": 0.0, "robustness.adv_teacher": False}   # one TRADES teacher (< session 18)
    if a.probe == "weights":   # the defaults when it ran (AugMix's ops until session 16's switch to PRIME's)
        robust |= {"robustness.jsd_weight": 48.0, "robustness.clean_teacher": "dual"}
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)
    seconds: dict = {}

    def stages(cfg, extra: Stage | None = None):
        sel = [s for s in STAGES if s.name in UPTO]
        if extra is not None:
            sel.insert([s.name for s in sel].index("robust_teacher") + 1, extra)
        return run_stages(cfg, Hooks(log=log), sel)

    if a.probe == "teacher-branches":
        return teacher_branches(a, base, robust, stages, log, load0, t_all)
    t0 = time.perf_counter()
    ema = {"export.weights": "ema"} if a.probe == "weights" else {}
    cfg_r = validate(resolve_config(None, base | robust | ema))
    st = stages(cfg_r)
    seconds["robust_compile"] = round(time.perf_counter() - t0, 1)
    dense, teacher, gm_r = st["robust_teacher"].plain, st["pretrain"].teacher, st["finetune"].gm

    def exported(gm):   # what the export stage makes of it: the clean branch, its BN statistics re-estimated
        m = copy.deepcopy(gm)
        collapse_to(m, "clean", st["data"].train, recalibrate=True)
        return m

    models = {"dense": dense.eval(), "teacher": teacher.eval()}
    if a.probe == "jsd":
        models[f"robust_jsd_{a.jsd_weight:g}"] = exported(gm_r)
    elif a.probe == "student-jsd":
        models["robust_student_jsd_0"] = exported(gm_r)
        for w in (float(v) for v in a.student_jsd.split(",")):
            t0 = time.perf_counter()
            st_w = stages(validate(resolve_config(None, base | robust | {"robustness.student_jsd": w})))
            models[f"robust_student_jsd_{w:g}"] = exported(st_w["finetune"].gm)
            seconds[f"robust_student_jsd_{w:g}"] = round(time.perf_counter() - t0, 1)
    elif a.probe == "kd-natural":
        models["robust_kd_natural_1"] = exported(gm_r)
        for w in (3.0, 5.0):
            t0 = time.perf_counter()
            st_w = stages(validate(resolve_config(None, base | robust | {"robustness.kd_natural": w})))
            models[f"robust_kd_natural_{w:g}"] = exported(st_w["finetune"].gm)
            seconds[f"robust_kd_natural_{w:g}"] = round(time.perf_counter() - t0, 1)
    elif a.probe == "weights":
        models["robust_ema"] = exported_ema(st)
        models["robust"] = exported(gm_r)
        t0 = time.perf_counter()
        st_l = stages(validate(resolve_config(None, base | robust | ema | {"finetune_epochs": a.long_finetune})))
        models[f"robust_ft{a.long_finetune}"] = exported(st_l["finetune"].gm)
        models[f"robust_ft{a.long_finetune}_ema"] = exported_ema(st_l)
        seconds[f"robust_ft{a.long_finetune}_compile"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        st_pl = stages(validate(resolve_config(None, base | ema | {"finetune_epochs": a.long_finetune})))
        models[f"plain_ft{a.long_finetune}"] = st_pl["finetune"].gm.cpu().eval()
        models[f"plain_ft{a.long_finetune}_ema"] = st_pl["finetune"].ema.cpu().eval()
        seconds[f"plain_ft{a.long_finetune}_compile"] = round(time.perf_counter() - t0, 1)
    else:
        methods(a, st, models, seconds, base, robust, stages, exported)

    finish(a, models, seconds, base | ema, stages, cfg_r, base | robust | ema, load0, t_all)


def exported_ema(st):
    """The finetune's EMA weights as the export stage makes them: the clean branch (its statistics re-estimated on
    the clean training batches when the average was formed)."""
    from relucomp.robust_train import collapse

    m = copy.deepcopy(st["finetune"].ema)
    collapse(m, "clean")
    return m.cpu().eval()


def finish(a, models: dict, seconds: dict, base: dict, stages, cfg, schedule: dict, load0, t_all: float) -> None:
    """Every probe's tail: the plain compile (reference), all models evaluated on the same validation images in
    one call, the row merged into ``--out``."""
    t0 = time.perf_counter()
    st_p = stages(validate(resolve_config(None, base)))
    models["plain"] = st_p["finetune"].gm.cpu().eval()
    if st_p["finetune"].ema is not None:
        models["plain_ema"] = st_p["finetune"].ema.cpu().eval()
    seconds["plain_compile"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    res = evaluate_robustness(models, st_p["data"].bundle.val, robustness_settings(cfg))
    seconds["evaluation"] = round(time.perf_counter() - t0, 1)
    report(a, res, seconds, schedule, load0, t_all)


def methods(a, st, models: dict, seconds: dict, base: dict, robust: dict, stages, exported) -> None:
    """The ``methods`` probe's models: teacher interpolation, student soup, dense-initialised student."""
    cfg_r, dense, teacher, gm_r = st.cfg, st["robust_teacher"].plain, st["pretrain"].teacher, st["finetune"].gm
    t0 = time.perf_counter()   # the clean endpoint of the student soup: same masks, plain objective
    gm_c = copy.deepcopy(gm_r)
    for p in gm_c.parameters():
        p.requires_grad_(True)
    PassManager([FinetunePass(train_loader=st["data"].train, teacher=dense, epochs=cfg_r.finetune.epochs,
                              lr=finetune_lr(cfg_r.runtime.batch_size), kd_weight=cfg_r.finetune.kd_weight,
                              temperature=cfg_r.finetune.temperature or cfg_r.search.kd_temperature,
                              bn_recalibrate=False)]).run(gm_c)
    seconds["clean_endpoint_finetune"] = round(time.perf_counter() - t0, 1)
    sd_t, sd_d = teacher.state_dict(), dense.state_dict()
    for alpha in (0.5, 0.75, 0.875):
        models[f"teacher_interp_{alpha}"] = interpolate(dense, sd_t, sd_d, alpha).eval()
    sd_r, sd_c = gm_r.state_dict(), gm_c.state_dict()
    for alpha in (0.0, 0.25, 0.5, 0.75, 1.0):
        models[f"student_soup_{alpha}"] = exported(interpolate(gm_r, sd_r, sd_c, alpha))

    t0 = time.perf_counter()   # dense init: the student starts from the dense model, not the robust teacher
    init = Stage("dense_init", lambda s: s["model"].model.load_state_dict(s["robust_teacher"].plain.state_dict()))
    st_d = stages(validate(resolve_config(None, base | robust)), init)
    models["dense_init"] = exported(st_d["finetune"].gm)
    seconds["dense_init_compile"] = round(time.perf_counter() - t0, 1)


def teacher_branches(a, base: dict, robust: dict, stages, log, load0, t_all: float) -> None:
    """The ``teacher-branches`` probe: the teachers only (cached when a compile of the same settings trained them)."""
    upto = [s for s in STAGES if s.name in ("data", "model", "pretrain", "robust_teacher")]
    seconds: dict = {}
    models: dict = {}
    t0 = time.perf_counter()
    for name, ct in (("one_bn", "robust"), ("dual", "dual")):
        cfg = validate(resolve_config(None, base | robust | {"robustness.jsd_weight": 48.0,
                                                             "robustness.clean_teacher": ct}))
        st = run_stages(cfg, Hooks(log=log), upto)
        models["dense"] = st["robust_teacher"].plain.eval()
        if name == "one_bn":
            models["teacher_one_bn"] = st["pretrain"].teacher.eval()
        else:
            models["teacher_dual_perturbed"] = st["pretrain"].teacher.eval()
            models["teacher_dual_clean"] = st["robust_teacher"].clean.eval()
    seconds["teachers"] = round(time.perf_counter() - t0, 1)
    finish(a, models, seconds, base, stages, cfg, base | robust | {"robustness.jsd_weight": 48.0}, load0, t_all)


def report(a, res, seconds: dict, schedule: dict, load0, t_all: float) -> None:
    """Print the table and merge this seed's row into ``--out``."""
    rows = {k: {"ca": round(v.ca, 2), "npa": round(v.npa, 2), "adva": round(v.adva, 2),
                "npa_by_corruption": {c: round(x, 2) for c, x in v.npa_by_corruption.items()}}
            for k, v in res.models.items()}
    p = rows["plain"]
    for v in rows.values():
        v["minus_plain"] = {m: round(v[m] - p[m], 2) for m in ("ca", "npa", "adva")}
    for k, v in rows.items():
        print(f"{k:24s} CA {v['ca']:5.1f}  NPA {v['npa']:5.2f}  AdvA {v['adva']:5.1f}   − plain "
              f"{v['minus_plain']['ca']:+5.1f} {v['minus_plain']['npa']:+5.2f} {v['minus_plain']['adva']:+5.1f}")
    run = {"seed": a.seed, "budget": a.budget, "variant": a.jsd_weight if a.probe == "jsd" else None, "models": rows,
           "seconds": seconds,
           "load_average": {"start": load0, "end": os.getloadavg()}}
    out = Path(a.out)
    prev = json.loads(out.read_text()) if out.exists() else {}
    same = lambda r: (r["seed"], r["budget"], r.get("variant")) == (a.seed, a.budget, run["variant"])
    runs = [r for r in prev.get("runs", []) if not same(r)] + [run]
    doc = {"benchmark": "robust_val_probes", "probe": a.probe, "split": "val", "samples": res.samples,
           "machine": {"description": f"{os.cpu_count()}-core CPU (no GPU)", "platform": platform.platform(),
                       "torch": torch.__version__, "torch_threads": a.threads},
           "schedule": schedule, "settings": res.settings, "runs": sorted(runs, key=lambda r: (r["budget"], r.get("variant") or 0, r["seed"])),
           "seconds_total_last_run": round(time.perf_counter() - t_all, 1)}
    atomic_write_json(out, doc)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()

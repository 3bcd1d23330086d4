"""Robustness benchmark (issue 12) → benchmarks/results/robust.json.

resnet8 (``--model``: another built-in or file.py:factory, e.g. benchmarks/wide_models.py:resnet8_w2) on a subset
of the CIFAR-10 JPEG folders (/work/shared/data/cifar10-jpeg, ``--limit`` images drawn
stratified from the official train/test split; quality-75 JPEG re-encodes, so accuracies are not the published
CIFAR-10 figures), compiled (plain compile: SNL search + finetune) at 2 ReLU budgets with
``eval_robustness=True``: clean (CA), natural-perturbation (NPA, mean over the 15 CIFAR-10-C corruptions at
severities 1-5 by default; ``--corruptions``/``--severities`` take subsets) and PGD L∞ (AdvA, ε = 8/255, step 2/255, 10 steps, random start)
accuracy of the dense and the compiled model, on a seeded subset of the test split — for the plain compile and
the robust compile (``robust=True``: TRADES + AugMix teacher with few-step PGD, robust mask search and
three-way distillation with dual BN, clean branch exported) at the same budget, same data, same dense model.
The goal (RLNet): robust − plain ≥ +10 AdvA and ≥ +3 NPA, CA within −2, at each budget; ``goal`` says
per budget whether it is met.

Small on purpose (the machine is a shared 2-core CPU): few images, short schedules.  The corrupted test sets
are made once per process (``relucomp.robustness`` memoises them), so the 4 evaluations of a seed pay for the
75 (corruption, severity) sets once.  Seeds may run as parallel processes writing one JSON.  Times measured
under load are upper bounds.

The defaults are the schedule of record: ``robust.json``'s rows are what these commands write (they were made in
session 18 with the same schedule spelled out as options; two seeds at a time as two parallel 1-thread processes
writing one JSON; rows written since keep the command that made them, ``argv``)::

    python benchmarks/bench_robust.py --seed 0 --threads 1 & python benchmarks/bench_robust.py --seed 1 --threads 1
    python benchmarks/bench_robust.py --seed 2 --threads 1 & python benchmarks/bench_robust.py --seed 3 --threads 1

(``tests/test_benchmarks.py`` checks that the defaults' ``schedule_key`` is the one in ``robust.json``.)  The JSON is
the checkpoint: rerun the same command after a stop and the seed's finished (budget, mode) compiles are kept
(``--no-resume`` recomputes them; the dense model and the teachers come from the relucomp cache either way).
The probes' files are the same command with the options named in the README's result index.  ``--quick`` is a smoke run
(short schedules, 200 evaluation images, written to ``robust_quick.json``), not a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
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

from relucomp.api import compile as rc_compile  # noqa: E402
from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.config import AUGMIX_OP_SETS, RobustnessSection  # noqa: E402

OUT = Path(__file__).parent / "results" / "robust.json"
DATA = Path("/work/shared/data/cifar10-jpeg")
CORRUPTIONS = "all"     # the 15 CIFAR-10-C corruptions (4 families + digital), as the issue asks


def machine() -> dict:
    return {"description": f"{os.cpu_count()}-core CPU (shared with other jobs; no GPU)", "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0]}


def summary(rows: list) -> dict:
    """Per budget, over the seeds: mean and sample std of CA / NPA / AdvA (plain and robust compiled) and of
    robust − plain; the goal judged on the means."""
    out: dict = {}
    for budget in dict.fromkeys(r["budget"] for r in rows):
        rs = [r for r in rows if r["budget"] == budget and "robust_minus_plain" in r]
        if not rs:
            continue

        def ms(vals: list) -> dict:
            return {"mean": round(statistics.fmean(vals), 2),
                    "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0, "values": vals}

        entry: dict = {"seeds": [r.get("seed", 0) for r in rs]}
        for mode in ("plain", "robust"):
            entry[mode] = {m: ms([r[mode]["compiled"][m] for r in rs]) for m in ("ca", "npa", "adva")}
        d = {m: ms([r["robust_minus_plain"][m] for r in rs]) for m in ("ca", "npa", "adva")}
        entry["robust_minus_plain"] = d
        entry["goal_on_means"] = {"adva_gain_ge_10": d["adva"]["mean"] >= 10, "npa_gain_ge_3": d["npa"]["mean"] >= 3,
                                  "ca_loss_le_2": d["ca"]["mean"] >= -2}
        entry["goal_met"] = all(entry["goal_on_means"].values())
        out[budget] = entry
    return out


def table(doc: dict) -> str:
    """Markdown table (README) from robust.json: per budget, compiled CA / NPA / AdvA, mean ± std over seeds."""
    def f(e: dict) -> str:
        return f"{e['mean']:.1f}" + (f" ± {e['std']:.1f}" if len(e["values"]) > 1 else "")

    dense = {}
    for r in doc["runs"]:
        for mode in ("plain", "robust"):
            dense.setdefault(mode, []).append(r[mode]["dense"])
    rows = ["| budget (seeds) | model | CA | NPA | AdvA |", "|---|---|---:|---:|---:|"]
    for budget, e in doc.get("summary", {}).items():
        n = len(e["seeds"])
        rows.append(f"| {budget} ({n}) | plain compile | {f(e['plain']['ca'])} | {f(e['plain']['npa'])} | "
                    f"{f(e['plain']['adva'])} |")
        rows.append(f"| | robust compile (clean BN exported) | {f(e['robust']['ca'])} | {f(e['robust']['npa'])} | "
                    f"{f(e['robust']['adva'])} |")
        d = e["robust_minus_plain"]
        ok = lambda k: "✓" if e["goal_on_means"][k] else "✗"  # noqa: E731
        rows.append(f"| | **robust − plain** (goal ≥ −2 / +3 / +10) | {f(d['ca'])} {ok('ca_loss_le_2')} | "
                    f"{f(d['npa'])} {ok('npa_gain_ge_3')} | {f(d['adva'])} {ok('adva_gain_ge_10')} |")
    return "\n".join(rows)


def ca_gap(doc: dict) -> str:
    """Markdown table: where robust − plain CA comes from, per budget (means over the seeds of ``doc``).

    robust − plain CA = (teacher − dense) + (robust student − teacher) − (plain − dense): what the robust teacher
    pays for its robustness, what compressing it costs the student, and what compressing the dense model costs
    the plain compile.  The teacher is the robust compile's ``dense`` row (the clean-term teacher, evaluated on the
    same images, clean BN branch)."""
    rows = ["| budget (seeds) | dense CA | teacher CA (AdvA) | teacher − dense | plain − dense | robust student − "
            "teacher | **robust − plain** |", "|---|---:|---:|---:|---:|---:|---:|"]
    for budget in dict.fromkeys(r["budget"] for r in doc["runs"]):
        rs = [r for r in doc["runs"] if r["budget"] == budget and "robust" in r and "plain" in r]
        if not rs:
            continue

        def mean(fn) -> float:     # rounded as summary() rounds, so the last column is the summary's mean
            return round(statistics.fmean(fn(r) for r in rs), 2)

        dense = mean(lambda r: r["plain"]["dense"]["ca"])
        teacher = mean(lambda r: r["robust"]["dense"]["ca"])
        plain = mean(lambda r: r["plain"]["compiled"]["ca"])
        student = mean(lambda r: r["robust"]["compiled"]["ca"])
        gap = mean(lambda r: r["robust"]["compiled"]["ca"] - r["plain"]["compiled"]["ca"])
        rows.append(f"| {budget} ({len(rs)}) | {dense:.1f} | {teacher:.1f} "
                    f"({mean(lambda r: r['robust']['dense']['adva']):.1f}) | {teacher - dense:+.1f} | "
                    f"{plain - dense:+.1f} | {student - teacher:+.1f} | **{gap:+.1f}** |")
    return "\n".join(rows)


#: the schedule of record (robust.json) and --quick's smoke schedule
RECORD = {"pretrain_epochs": 20, "epochs": 3, "finetune_epochs": 4, "teacher_epochs": 20, "samples": 500}
QUICK = {"pretrain_epochs": 4, "epochs": 1, "finetune_epochs": 1, "teacher_epochs": 2, "samples": 200}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="CA / NPA / AdvA of the plain and the robust compile (issue 12)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--model", default="resnet8",
                    help="the compiled model: a built-in name or file.py:factory (e.g. "
                         "benchmarks/wide_models.py:resnet8_w2); default resnet8")
    ap.add_argument("--budgets", default="10%,30%")
    ap.add_argument("--samples", type=int, default=None, help=f"evaluation images (default {RECORD['samples']})")
    ap.add_argument("--corruptions", default=CORRUPTIONS)
    ap.add_argument("--severities", default="1,2,3,4,5")
    ap.add_argument("--pretrain-epochs", type=int, default=None, help=f"default {RECORD['pretrain_epochs']}")
    ap.add_argument("--epochs", type=int, default=None, help=f"mask-search epochs (default {RECORD['epochs']})")
    ap.add_argument("--finetune-epochs", type=int, default=None, help=f"default {RECORD['finetune_epochs']}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher-epochs", type=int, default=None,
                    help=f"each robust teacher's epochs (default {RECORD['teacher_epochs']})")
    ap.add_argument("--train-attack-steps", type=int, default=2)
    ap.add_argument("--teacher-lr", type=float, default=None,
                    help="robustness.teacher_lr: the teachers' peak learning rate (default: 0.2 × the pretraining's)")
    ap.add_argument("--adv-teacher-lr", type=float, default=None,
                    help="robustness.adv_teacher_lr: the second teacher's (default: --teacher-lr's)")
    ap.add_argument("--modes", default="plain,robust")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="the split CA / NPA / AdvA are measured on (val: to choose settings without the test split)")
    ap.add_argument("--trades-beta", type=float, default=RobustnessSection().trades_beta,
                    help="TRADES β of the robust teacher (default: the config's)")
    ap.add_argument("--train-epsilon", default="8/255",
                    help="robustness.train_epsilon: the training attack's ε (teacher and KD); AdvA stays at 8/255")
    ap.add_argument("--jsd-weight", type=float, default=RobustnessSection().jsd_weight,
                    help="robustness.jsd_weight: the teacher's AugMix JSD consistency weight (default: the config's)")
    ap.add_argument("--helper-weight", type=float, default=RobustnessSection().helper_weight,
                    help="robustness.helper_weight: HAT's helper term in the teacher's step (0: off)")
    ap.add_argument("--adv-teacher-beta", type=float, default=RobustnessSection().adv_teacher_beta,
                    help="robustness.adv_teacher_beta: TRADES β of the second robust teacher (no helper), the "
                         "student's adversarial KD term's")
    ap.add_argument("--one-teacher", action="store_true",
                    help="robustness.adv_teacher = false: one robust teacher for all three KD terms (the default "
                         "before session 18)")
    ap.add_argument("--student-init", default=RobustnessSection().student_init,
                    help="robustness.student_init: the student starts from the adversarial term's teacher (default), "
                         "the robust one (robust), or a weight average of the two (a number: the adversarial one's "
                         "weight)")
    ap.add_argument("--natural-branch", default="perturbed", choices=("perturbed", "clean"),
                    help="robustness.natural_branch: the dual-BN branch the AugMix views train on")
    ap.add_argument("--search-objective", default="robust", choices=("robust", "clean"),
                    help="robustness.search_objective: the mask search's loss (clean: its clean KD term only)")
    ap.add_argument("--clean-teacher", default=RobustnessSection().clean_teacher, choices=("dual", "robust", "dense"),
                    help="robustness.clean_teacher: the clean KD term's teacher (dual: the dual-BN teacher's clean "
                         "branch; dense: MTARD's clean teacher)")
    ap.add_argument("--kd-clean", type=float, default=1.0,
                    help="robustness.kd_clean: weight of the clean term of the three-way KD")
    ap.add_argument("--kd-adv", type=float, default=1.0,
                    help="robustness.kd_adv: weight of the adversarial term of the three-way KD")
    ap.add_argument("--augmix-ops", default=RobustnessSection().augmix_ops, choices=AUGMIX_OP_SETS,
                    help="robustness.augmix_ops: the op set of the AugMix views (default: the config's; files "
                         "written before session 16 used augmix)")
    ap.add_argument("--student-augmix-ops", default=None, choices=AUGMIX_OP_SETS,
                    help="robustness.student_augmix_ops: the student's AugMix op set (default: the teacher's)")
    ap.add_argument("--distill-from", default=None, metavar="MODEL",
                    help="robust compile: the second (adversarial) teacher distilled from MODEL's own TRADES β 6 "
                         "teacher (made by this script's robust_teacher stage on MODEL, same seed and schedule, "
                         "cached) — robustness.adv_teacher_from; e.g. benchmarks/wide_models.py:resnet8_w2")
    ap.add_argument("--seed", type=int, default=0, help="seed of the whole run (data subset, pretraining, compiles)")
    ap.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                    help="keep this seed's finished (budget, mode) results from --out when its schedule key is the "
                         "same (the JSON is the checkpoint: a stopped run restarts at the compile it was in); "
                         "--no-resume recomputes them")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK} unless given, written to robust_quick.json unless --out")
    ap.add_argument("--out", default=None, help=f"default {OUT} (robust_quick.json with --quick)")
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--command", metavar="FILE", default=None,
                    help="print the options that regenerate FILE (a robust*.json) with today's defaults, and exit")
    return ap


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with the schedule's unset values filled from RECORD (or QUICK with --quick)."""
    a = parser().parse_args(argv)
    for k, v in (QUICK if a.quick else RECORD).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.out is None:
        a.out = str(OUT.with_name("robust_quick.json") if a.quick else OUT)
    return a


def schedule_key(a: argparse.Namespace) -> dict:
    """What makes two runs' rows comparable: the rows of one JSON share it (seeds are added, never mixed)."""
    key = {"limit": a.limit, "budgets": a.budgets, "samples": a.samples, "corruptions": a.corruptions,
           "severities": a.severities, "pretrain_epochs": a.pretrain_epochs, "search_epochs": a.epochs,
           "finetune_epochs": a.finetune_epochs, "teacher_epochs": a.teacher_epochs,
           "train_attack_steps": a.train_attack_steps, "modes": a.modes}
    if a.model != "resnet8":               # keys without it mean resnet8
        key |= {"model": a.model}
    if a.split != "test" or a.trades_beta != 6.0:   # keys of earlier results (test split, β 6) stay valid
        key |= {"split": a.split, "trades_beta": a.trades_beta}
    if a.natural_branch != "perturbed":
        key |= {"natural_branch": a.natural_branch}
    if a.kd_clean != 1.0:
        key |= {"kd_clean": a.kd_clean}
    if a.kd_adv != 1.0:
        key |= {"kd_adv": a.kd_adv}
    if a.augmix_ops != "augmix":           # keys without it mean AugMix's ops (the default before session 16)
        key |= {"augmix_ops": a.augmix_ops}
    if a.student_augmix_ops is not None:
        key |= {"student_augmix_ops": a.student_augmix_ops}
    if a.helper_weight != 0:               # HAT (session 17); keys without it mean off
        key |= {"helper_weight": a.helper_weight}
    if two_teachers(a):                    # two teachers (session 18); keys without it mean one
        key |= {"adv_teacher_beta": a.adv_teacher_beta}
    if two_teachers(a) and a.student_init != "robust":  # one teacher: both inits are the robust teacher
        key |= {"student_init": a.student_init}
    if a.search_objective != "robust":     # session 21; keys without it mean the robust search
        key |= {"search_objective": a.search_objective}
    key |= {"clean_teacher": a.clean_teacher}  # always: the default changed (robust → dual)
    if a.train_epsilon != "8/255":
        key |= {"train_epsilon": a.train_epsilon}
    if a.teacher_lr is not None:           # keys without it mean 0.2 × the pretraining learning rate
        key |= {"teacher_lr": a.teacher_lr}
    if a.adv_teacher_lr is not None:
        key |= {"adv_teacher_lr": a.adv_teacher_lr}
    key |= {"jsd_weight": a.jsd_weight}    # always: the default changed (12 → 48), so keys without it mean 12
    if a.distill_from is not None:         # session 25; keys without it mean plain TRADES teachers
        key |= {"distill_from": a.distill_from}
    return key


#: what a schedule key without the field meant when it was written (see the comments in schedule_key)
KEY_ABSENT = {"split": "test", "trades_beta": 6.0, "natural_branch": "perturbed", "kd_clean": 1.0, "kd_adv": 1.0,
              "augmix_ops": "augmix", "student_augmix_ops": None, "helper_weight": 0.0, "search_objective": "robust",
              "clean_teacher": "robust", "train_epsilon": "8/255", "teacher_lr": None, "adv_teacher_lr": None,
              "jsd_weight": 12.0, "model": "resnet8", "distill_from": None}
#: schedule-key field → option
KEY_OPTION = {"search_epochs": "epochs"}


def normalized(key: dict) -> dict:
    """``key`` with every field it leaves out filled with what leaving it out meant (keys written before an option
    existed compare equal to today's keys of the same schedule)."""
    full = KEY_ABSENT | {"student_init": "robust"} | dict(key)
    if "adv_teacher_beta" not in key:        # one teacher: both inits are it
        full["student_init"] = "robust"
    return full


def command_for(key: dict) -> list[str]:
    """The options that make today's script write rows under ``key`` (a recorded ``schedule_key``): the command
    that regenerates a file written under earlier defaults (``--command FILE``)."""
    want = normalized(key)
    now = parse([])
    argv: list[str] = []
    if "adv_teacher_beta" not in key and two_teachers(now):
        argv.append("--one-teacher")
    for field, value in want.items():
        opt = KEY_OPTION.get(field, field)
        if field == "student_init" and "adv_teacher_beta" not in key:
            continue                         # one teacher: the key never holds it
        if getattr(now, opt) != value and value is not None:
            argv += [f"--{opt.replace('_', '-')}", f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


def robust_kwargs(a: argparse.Namespace) -> dict:
    """The compile keywords of a robust run with ``a``'s options (the robust teachers' cache keys follow from them)."""
    kw = dict(robust=True, robust_teacher_epochs=a.teacher_epochs, trades_beta=a.trades_beta,
              train_attack_steps=a.train_attack_steps, natural_branch=a.natural_branch, clean_teacher=a.clean_teacher,
              kd_clean=a.kd_clean, kd_adv=a.kd_adv, augmix_ops=a.augmix_ops, student_augmix_ops=a.student_augmix_ops,
              train_epsilon=a.train_epsilon,
              **{"robustness.jsd_weight": a.jsd_weight, "robustness.helper_weight": a.helper_weight,
                 "robustness.adv_teacher": not a.one_teacher, "robustness.adv_teacher_beta": a.adv_teacher_beta,
                 "robustness.student_init": a.student_init, "robustness.teacher_lr": a.teacher_lr,
                 "robustness.adv_teacher_lr": a.adv_teacher_lr, "robustness.search_objective": a.search_objective})
    if a.distill_from is not None:
        kw |= {"robustness.adv_teacher_from": a.distill_from,
               "robustness.adv_teacher_from_checkpoint": str(distill_source(a))}
    return kw


def robust_teachers(a: argparse.Namespace, model: str | None = None):
    """The run state after the data, model, pretrain and robust_teacher stages of ``a``'s robust compile — or, with
    ``model``, of the same compile of ``model`` with plain TRADES teachers (what ``--distill-from model`` distils
    from): the dense model and the robust teachers, from the relucomp cache when ``bench_robust.py`` runs made
    them."""
    from relucomp.api import split_arguments
    from relucomp.config import resolve_config, validate
    from relucomp.stages import STAGES, run as run_stages

    spec = model or a.model
    hooks, ov = split_arguments(spec, f"cifar10:{a.data}", dict(
        relu_budget="30%", limit=a.limit, pretrain_epochs=a.pretrain_epochs, search_epochs=a.epochs,
        finetune_epochs=a.finetune_epochs, export=False, progress=False, seed=a.seed,
        log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True),
        **robust_kwargs(a if model is None else argparse.Namespace(**{**vars(a), "distill_from": None}))))
    cfg = validate(resolve_config(None, ov), check_data=True)
    wanted = ("data", "model", "pretrain", "robust_teacher")
    return run_stages(cfg, hooks, [s for s in STAGES if s.name in wanted]), cfg


def distill_source(a: argparse.Namespace) -> Path:
    """``--distill-from MODEL``: MODEL's TRADES β 6 teacher (the robust_teacher stage's second teacher, its perturbed
    BN branch) for ``a``'s seed and schedule, saved once as a state_dict in the relucomp cache."""
    from relucomp.cache import cache_dir

    tag = hashlib.sha1(json.dumps([a.distill_from, a.seed, schedule_key(argparse.Namespace(
        **{**vars(a), "distill_from": None}))], sort_keys=True).encode()).hexdigest()[:12]
    path = (cache_dir("models") or Path(tempfile.gettempdir())) / f"distill-source-{tag}.pt"
    if not path.exists():
        st, _ = robust_teachers(a, a.distill_from)
        teacher = st["robust_teacher"].adversarial
        if teacher is None:
            sys.exit("--distill-from needs two teachers (the source is the second one): drop --one-teacher")
        torch.save(teacher.state_dict(), path)
    return path


def two_teachers(a: argparse.Namespace) -> bool:
    return not a.one_teacher and (a.trades_beta, a.helper_weight) != (a.adv_teacher_beta, 0)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.command:
        key = json.loads(Path(a.command).read_text()).get("schedule_key")
        if key is None:
            sys.exit(f"{a.command} has no schedule_key (not written by this script)")
        print(" ".join(["python", "benchmarks/bench_robust.py", *command_for(key)]))
        return
    if a.table:
        doc = json.loads(Path(a.out).read_text())
        print(table(doc) + "\n\nWhere robust − plain CA comes from:\n\n" + ca_gap(doc))
        return
    torch.set_num_threads(a.threads)
    if not Path(a.data).is_dir():
        sys.exit(f"no CIFAR-10 folders at {a.data} (pass --data)")
    info = machine()
    runs, t_all = [], time.perf_counter()
    key = schedule_key(a)
    two = two_teachers(a)
    argv_used = list(sys.argv[1:] if argv is None else argv)

    def kept() -> list:
        """Rows of other seeds with the same schedule (one JSON, many seeds), re-read at every write so that
        seeds may run as parallel processes."""
        if not Path(a.out).exists():
            return []
        prev = json.loads(Path(a.out).read_text())
        if prev.get("schedule_key") != key:
            return []
        return [r for r in prev.get("runs", []) if r.get("seed", 0) != a.seed]

    def one(budget: str, robust: bool) -> dict:
        t0 = time.perf_counter()
        extra = dict(robust_kwargs(a), compare_branches=True) if robust else {}
        res = rc_compile(a.model, f"cifar10:{a.data}", relu_budget=budget, limit=a.limit,
                         pretrain_epochs=a.pretrain_epochs, search_epochs=a.epochs, finetune_epochs=a.finetune_epochs,
                         export=False, progress=False, eval_robustness=True, corruptions=a.corruptions,
                         severities=a.severities, robustness_samples=a.samples, robustness_split=a.split, seed=a.seed,
                         log=lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True), **extra)
        rep = res.report
        rb = rep.robustness
        row = {"relus": rep.relus_after, "relus_dense": rep.relus_before,
               "test_acc_full_split": {"dense": rep.test_accuracy[0], "compiled": rep.test_accuracy[1]}}
        for model in rb["models"]:
            m = rb["models"][model]
            row[model] = {k: round(m[k], 2) for k in ("ca", "npa", "adva")} | {
                "npa_by_corruption": {c: round(v, 2) for c, v in m["npa_by_corruption"].items()},
                "npa_by_severity": {c: round(v, 2) for c, v in m["npa_by_severity"].items()}}
        if robust:
            rc = rb.get("robust_compile") or {}
            row["robust_compile"] = rc.get("teacher")
            row["teacher_history"] = rc.get("teacher_history")
            row["dense_is"] = "the robust teacher (adversarially finetuned dense model)"
        row["seconds"] = {"total": round(time.perf_counter() - t0, 1), **{k: rep.phases_seconds.get(k) for k in (
            "pretrain", "robust_teacher", "search", "finetune", "robustness") if rep.phases_seconds.get(k)}}
        print(json.dumps({k: row.get(k) for k in ("relus", "dense", "compiled")}, default=str)[:400], flush=True)
        return row, rep

    def write(runs: list, done: bool) -> None:
        rows = kept() + runs
        doc = {"schedule_key": key, "seeds": sorted({r.get("seed", 0) for r in rows}),"benchmark": "robust", "machine": info, "load_average_at_end": os.getloadavg(), "complete": done,
               "data": {"spec": f"cifar10:{a.data}", "limit": a.limit, "splits": splits,
                        "note": "CIFAR-10 as quality-75 JPEG folders; a stratified --limit subset of the official "
                                "split, 32x32"},
               "settings": {**settings, "pretrain_epochs": a.pretrain_epochs, "search_epochs": a.epochs,
                            "finetune_epochs": a.finetune_epochs, "model": a.model, "run_seed": a.seed,
                            "split": a.split,
                            "robust": {"teacher_epochs": a.teacher_epochs, "train_attack": "trades",
                                       "teacher_lr": a.teacher_lr if a.teacher_lr is not None else "0.2 x pretrain lr",
                                       "adv_teacher_lr": (a.adv_teacher_lr if a.adv_teacher_lr is not None
                                                          else "teacher_lr") if two else None,
                                       "trades_beta": a.trades_beta, "helper_weight": a.helper_weight,
                                       "adv_teacher_beta": a.adv_teacher_beta if two else None,
                                       "student_init": a.student_init if two else "robust",
                                       "train_attack_steps": a.train_attack_steps, "train_epsilon": a.train_epsilon,
                                       "augmix": True, "augmix_ops": a.augmix_ops,
                                       "student_augmix_ops": a.student_augmix_ops or a.augmix_ops,
                                       "jsd_weight": a.jsd_weight, "dual_bn": True,
                                       "kd_weights": {"clean": a.kd_clean, "natural": 1.0, "adversarial": a.kd_adv},
                                       "exported_branch": "clean", "search_objective": a.search_objective,
                                       "note": f"training attack PGD-{a.train_attack_steps} with random start "
                                               "(CPU budget); evaluation PGD-10"}},
               "goal": "RLNet: robust − plain ≥ +10 AdvA, ≥ +3 NPA, ≥ −2 CA at the same budget",
               "runs": rows, "summary": summary(rows), "seconds_total": round(time.perf_counter() - t_all, 1)}
        atomic_write_json(Path(a.out), doc)
        print(f"wrote {a.out}", flush=True)

    settings: dict = {}
    splits: dict = {}
    done_rows: dict = {}
    if a.resume and Path(a.out).exists():
        prev = json.loads(Path(a.out).read_text())
        if prev.get("schedule_key") == key:
            done_rows = {r["budget"]: r for r in prev.get("runs", []) if r.get("seed", 0) == a.seed}
            if done_rows:
                settings.update(prev.get("settings", {}))   # write() sets the script's own keys over these
                splits.update(prev.get("data", {}).get("splits") or {})
    modes = a.modes.split(",")
    for budget in a.budgets.split(","):
        row: dict = {"budget": budget, "seed": a.seed, "argv": argv_used}
        for mode in modes:
            if mode in done_rows.get(budget, {}):
                row[mode] = done_rows[budget][mode]
                if done_rows[budget].get("argv") is not None:
                    row.setdefault("argv_resumed_from", done_rows[budget]["argv"])
                print(f"[{time.strftime('%H:%M:%S')}] {budget} {mode}: kept from {a.out} (--no-resume recomputes)",
                      flush=True)
                continue
            row[mode], rep = one(budget, mode == "robust")
            settings.update(rep.robustness["settings"], samples_evaluated=rep.robustness["samples"])
            splits.update({k: v["n"] for k, v in (rep.data.get("summary", {}).get("splits") or {}).items()})
            write(runs + [row], done=False)
        if "plain" in row and "robust" in row:
            p, r = row["plain"]["compiled"], row["robust"]["compiled"]
            d = {k: round(r[k] - p[k], 2) for k in ("ca", "npa", "adva")}
            row["robust_minus_plain"] = d
            row["goal"] = {"adva_gain_ge_10": d["adva"] >= 10, "npa_gain_ge_3": d["npa"] >= 3,
                           "ca_loss_le_2": d["ca"] >= -2}
            row["goal_met"] = all(row["goal"].values())
        runs.append(row)
        write(runs, done=False)     # after every budget: a partial result survives a stopped run
    write(runs, done=True)


if __name__ == "__main__":
    main()

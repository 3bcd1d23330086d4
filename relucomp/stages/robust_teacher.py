"""Stage ``robust_teacher`` (``--robust``): make the dense teacher robust — adversarial finetune (TRADES or PGD,
few attack steps) with AugMix + JSD (:func:`relucomp.robust_train.teacher_step`; HAT's helper term by default) —
unless the given model is already robust (``robustness.teacher_robust``).  By default a second robust teacher is
made the same way at TRADES ``robustness.adv_teacher_beta`` without the helper term (``robustness.adv_teacher``):
it teaches the student's adversarial KD term, and the student (the model the gates are inserted into) starts from
its weights (``robustness.student_init``; "robust": the first teacher's).  Each teacher is cached next to the
pretrained models (key: the pretraining key + the settings the teacher's training reads, :func:`teacher_digest`),
so a budget sweep — or one over the student's KD weights or BN branches — trains it once; an interrupted teacher
finetune starts again.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache import cache_dir
from ..config import CompileConfig, layer_cut
from ..errors import RelucompError
from ..robust_train import ROBUST_PRESETS, RobustTrainSettings, collapse, dualize, teacher_step
from ..robustness import parse_epsilon
from ..train import Checkpointer, load_state, make_optimizer, train_loop
from .base import RunState

NAME = "robust_teacher"


@dataclass
class RobustTeacherOut:
    info: dict[str, Any] = field(default_factory=dict)
    plain: nn.Module | None = None          # the dense teacher before the adversarial finetune
    clean: nn.Module | None = None          # clean_teacher = "dual": the dual-BN teacher's clean branch
    adversarial: nn.Module | None = None    # adv_teacher_beta: the adversarial KD term's teacher


def when(st: RunState) -> bool:
    return st.cfg.robustness.robust


def schedule(cfg: CompileConfig) -> tuple[int, int]:
    """(teacher adversarial-finetune epochs, training attack steps): explicit, else the effort preset's."""
    from ..recipe import DEFAULT_EFFORT

    ep, steps = ROBUST_PRESETS[(cfg.runtime.effort or DEFAULT_EFFORT).lower()]
    rb = cfg.robustness
    return (ep if rb.teacher_epochs is None else rb.teacher_epochs,
            steps if rb.train_attack_steps is None else rb.train_attack_steps)


def train_settings(st: RunState) -> RobustTrainSettings:
    rb, bundle = st.cfg.robustness, st["data"].bundle
    return RobustTrainSettings(mean=tuple(bundle.train.mean), std=tuple(bundle.train.std),
                               epsilon=parse_epsilon(rb.train_epsilon, "--train-epsilon"),
                               attack_steps=schedule(st.cfg)[1], attack=rb.train_attack, trades_beta=rb.trades_beta,
                               helper_weight=rb.helper_weight, augmix=rb.augmix, augmix_ops=rb.augmix_ops,
                               jsd_weight=rb.jsd_weight, kd_clean=rb.kd_clean, kd_natural=rb.kd_natural,
                               kd_adv=rb.kd_adv, student_jsd=rb.student_jsd,
                               natural_branch=rb.natural_branch)


# settings in the stage's ``info`` that only the student's training reads: not part of the teacher's cache key,
# so a sweep over them (KD weights, BN branches, the clean KD teacher) reuses one robust teacher
STUDENT_ONLY = ("dual_bn", "export_branch", "natural_branch", "clean_teacher", "kd_weights", "student_jsd",
                "student_augmix_ops", "adv_teacher", "student_init", "search_objective")


def teacher_lrs(cfg: CompileConfig) -> tuple[float, float, float]:
    """The two teachers' peak learning rates — ``robustness.teacher_lr`` (default 0.2 × the pretraining's) and
    ``adv_teacher_lr`` (default: the first's) — and that default (a rate equal to it stays out of cache keys)."""
    rb = cfg.robustness
    default = cfg.model.pretrain_lr * 0.2
    lr = default if rb.teacher_lr is None else rb.teacher_lr
    return lr, lr if rb.adv_teacher_lr is None else rb.adv_teacher_lr, default


def teacher_digest(key: str, epochs: int, info: dict[str, Any], seed: int) -> str:
    """The robust teacher's cache digest: the pretraining key, the epochs, the settings the teacher's own
    training reads (``info`` less :data:`STUDENT_ONLY`) and the seed."""
    material = json.dumps([key, epochs, {k: v for k, v in info.items() if k not in STUDENT_ONLY}, seed],
                          sort_keys=True, default=str)
    return hashlib.sha1(material.encode()).hexdigest()[:10]


def _frozen(model: nn.Module) -> nn.Module:
    model = model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def run(st: RunState) -> RobustTeacherOut:
    cfg, pre = st.cfg, st["pretrain"]
    epochs, steps = schedule(cfg)
    s = train_settings(st)
    info: dict[str, Any] = {"teacher_epochs": epochs, "train_attack": cfg.robustness.train_attack,
                            "train_attack_steps": steps, "train_epsilon": s.epsilon, "train_step": s.step_size,
                            "trades_beta": s.trades_beta, "augmix": s.augmix, "jsd_weight": s.jsd_weight,
                            "kd_weights": {"clean": s.kd_clean, "natural": s.kd_natural, "adversarial": s.kd_adv},
                            "dual_bn": cfg.robustness.dual_bn, "export_branch": cfg.robustness.export_branch,
                            "natural_branch": cfg.robustness.natural_branch,
                            "clean_teacher": cfg.robustness.clean_teacher, "student_jsd": s.student_jsd,
                            "search_objective": cfg.robustness.search_objective}
    if s.helper_weight > 0:                 # HAT (off before session 17: old cache keys stay)
        info["helper_weight"] = s.helper_weight
    lr, lr2, default_lr = teacher_lrs(cfg)
    if not math.isclose(lr, default_lr):    # in the key only when not the default (earlier cache keys stay)
        info["teacher_lr"] = lr
    if s.augmix_ops != "augmix":            # AugMix's own ops (the default before PRIME's) keep their cache keys
        info["augmix_ops"] = s.augmix_ops
    if cfg.robustness.student_augmix_ops is not None:
        info["student_augmix_ops"] = cfg.robustness.student_augmix_ops
    if cfg.robustness.teacher_robust or epochs == 0:
        info["adversarial_finetune"] = False
        info["why"] = "the given model is declared robust" if cfg.robustness.teacher_robust else "teacher_epochs = 0"
        return RobustTeacherOut(info=info, plain=pre.teacher)
    dual = cfg.robustness.clean_teacher == "dual"
    if dual:                                # the teacher's own training changes: part of its cache key
        info["teacher_dual_bn"] = True
    rb = cfg.robustness
    key_info = dict(info)                   # the teacher's cache key reads these (out= adds cached / lr / history)
    model = _adversarial_finetune(st, s, key_info, epochs=epochs, lr=lr, dual=dual, what="robust teacher", out=info)
    # the adversarial term's teacher: the robust teacher's settings at adv_teacher_beta, TRADES, no helper — the key
    # a one-teacher run at that β has, so a teacher trained (or cached) by such a run is reused; not trained when
    # nothing would read it, and the robust teacher itself when the settings agree
    s2 = dataclasses.replace(s, attack="trades", trades_beta=rb.adv_teacher_beta, helper_weight=0.0)
    adversarial = None
    distill = st["model"].adv_teacher_from
    if rb.adv_teacher and (s2 != s or not math.isclose(lr2, lr) or distill is not None) and (
            s.kd_adv > 0 or rb.student_init != "robust"):
        info2 = {k: v for k, v in key_info.items() if k not in ("helper_weight", "teacher_lr")}
        info2 |= {"train_attack": "trades", "trades_beta": s2.trades_beta}
        if not math.isclose(lr2, default_lr):
            info2["teacher_lr"] = lr2
        if distill is not None:             # distilled from a robust model: its spec and weights enter the key
            info2["distilled_from"] = {"model": rb.adv_teacher_from,
                                       "weights_sha1": _state_digest(distill)}
        adversarial = _adversarial_finetune(st, s2, info2, epochs=epochs, lr=lr2, dual=dual,
                                            what="adversarial teacher", out=info2, distill=distill)
        if dual:
            collapse(adversarial, "perturbed")
        info["adv_teacher"] = {"trades_beta": s2.trades_beta, "teaches": "the adversarial KD term",
                               **{k: info2[k] for k in ("distilled_from", "cached", "lr", "history") if k in info2}}
    info["adversarial_finetune"] = True
    clean = None
    if dual:                                # robust = the perturbed branch; the clean one teaches the clean term
        clean = copy.deepcopy(model)
        collapse(clean, "clean")
        collapse(model, "perturbed")
    # the student starts from a robust teacher's weights: the adversarial one's, the robust one's, or an average
    w = {"adversarial": 1.0, "robust": 0.0}.get(rb.student_init, rb.student_init) if adversarial is not None else 0.0
    if isinstance(w, str):                  # layer-wise: "first:prefix"
        first, _, prefix = w.partition(":")
        a, b = (adversarial, model) if first == "adversarial" else (model, adversarial)
        start, k = _layered(a.state_dict(), b.state_dict(), prefix)
        other = "robust" if first == "adversarial" else "adversarial"
        info["student_init"] = f"layer-wise: {first} teacher before {prefix} ({k} tensors), {other} teacher from it on"
    elif w in (0.0, 1.0):
        start = (adversarial if w == 1.0 else model).state_dict()
        info["student_init"] = "adversarial teacher" if w == 1.0 else "robust teacher"
    else:
        start = _average(model.state_dict(), adversarial.state_dict(), w)
        info["student_init"] = f"weight average: {1 - w:g} robust teacher + {w:g} adversarial teacher"
    st["model"].model.load_state_dict(start)
    plain = pre.teacher
    pre.teacher = _frozen(model)
    return RobustTeacherOut(info=info, plain=plain, clean=None if clean is None else _frozen(clean),
                            adversarial=None if adversarial is None else _frozen(adversarial))


def _layered(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str
             ) -> tuple[dict[str, torch.Tensor], int]:
    """``a``'s tensors before the first one whose name starts with ``prefix`` (state-dict order: the network's
    order), ``b``'s from there on; and how many came from ``a``."""
    cut = layer_cut(list(a), prefix)       # checked by the model stage: a later layer of the student
    return {k: (a if i < cut else b)[k] for i, k in enumerate(a)}, cut


def _average(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], w: float) -> dict[str, torch.Tensor]:
    """``(1 − w)·a + w·b`` over two state dicts of one architecture (weights and BN statistics; integer buffers
    such as BN's batch counters are ``a``'s) — a two-model soup (Wortsman et al. 2022)."""
    return {k: torch.lerp(v, b[k], w) if v.is_floating_point() else v for k, v in a.items()}


def _state_digest(model: nn.Module) -> str:
    """SHA-1 of a model's state (names, shapes, values) — not of the file it came from: torch.save names the
    archive after the file, so one set of weights saved under two names would differ byte for byte."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _adversarial_finetune(st: RunState, s: RobustTrainSettings, key_info: dict[str, Any], *, epochs: int,
                          lr: float, dual: bool, what: str, out: dict[str, Any],
                          distill: nn.Module | None = None) -> nn.Module:
    """The dense teacher adversarially finetuned with ``s`` (dual-BN if ``dual``; TRADES's robust term distilled
    from ``distill`` when given): from the cache (key: :func:`teacher_digest` of ``key_info``) or trained and
    cached; ``out`` gains ``cached`` or ``lr`` / ``history``."""
    from . import pretrain

    cfg, pre = st.cfg, st["pretrain"]
    model = copy.deepcopy(pre.teacher)
    if dual:
        dualize(model)
    for p in model.parameters():
        p.requires_grad_(True)
    key = pretrain.cache_key(st, pre.epochs)
    models = cache_dir("models")
    path = None
    if key is not None and models is not None:
        path = models / f"{key}-robust-{teacher_digest(key, epochs, key_info, cfg.runtime.seed)}.pt"
    if path is not None and path.exists():
        try:
            state = load_state(path)
            model.load_state_dict(state["state_dict"])
            out.update(state.get("info", {}), cached=str(path))
            return model
        except (RelucompError, KeyError, RuntimeError):
            path.unlink(missing_ok=True)
    st.say(f"{what}: {epochs} epochs of {s.attack.upper()} adversarial finetuning "
           f"(PGD-{s.attack_steps}, ε = {s.epsilon:.4f}"
           + (f", β = {s.trades_beta:g}" if s.attack == "trades" else "") + ")"
           + (f" + AugMix/JSD{'' if s.augmix_ops == 'augmix' else f' ({s.augmix_ops} ops)'}" if s.augmix else "")
           + (f", robust term distilled from {key_info['distilled_from']['model']}" if distill is not None else ""))
    torch.manual_seed(cfg.runtime.seed)
    loader = st["data"].train
    opt = make_optimizer(model.parameters(), lr=lr)
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(1.0, k / total))))
    helper = None
    if s.helper_weight > 0:                 # HAT's standard model: the dense teacher before this finetune
        helper = _frozen(copy.deepcopy(pre.teacher)).to(cfg.runtime.device)
    if distill is not None:
        distill = _frozen(distill).to(cfg.runtime.device)
    step = teacher_step(s, progress=st.progress, helper=helper, distill=distill)
    hist = train_loop(model, loader, epochs=epochs, optimizer=opt, step_fn=step, desc=what, progress=st.progress,
                      after_step=lambda k: sched.step(), device=cfg.runtime.device)
    step.bar.close()
    model.cpu()
    out.update(lr=lr, history=[{k: (round(v, 4) if isinstance(v, float) else v) for k, v in h.items()}
                               for h in hist])
    if path is not None:
        Checkpointer(path).save({"state_dict": model.state_dict(), "info": {"lr": lr, "history": out["history"]}})
    return model

"""Robust training for the robust compile (``--robust``; RLNet, Sarkar, Kundu, Beerel): the pieces the stages use.

* :func:`augmix` — AugMix (Hendrycks et al., ICLR'20) in plain torch on pixel-space ``N x 3 x H x W`` batches:
  ``width`` chains of 1-3 random ops (autocontrast, posterize, solarize, rotate, shear x/y, translate x/y —
  AugMix's op set, which excludes the ops that overlap the CIFAR-10-C test corruptions: noise, blur,
  brightness, contrast, colour, sharpness), mixed with Dirichlet(α) weights, then blended with the clean image
  with a Beta(α, α) weight.  :func:`jsd_loss` is AugMix's Jensen-Shannon consistency term.  ``ops="prime"``
  draws the chains' ops from PRIME's primitives instead (:data:`PRIME_OPS`: random filters, smooth colour
  curves, smooth deformations; Modas et al., ECCV'22), ``"augmix+prime"`` from both (:data:`OP_SETS`).
* :class:`DualBatchNorm2d` — separate running statistics and affine parameters for clean and perturbed
  (corrupted / adversarial) batches, sharing everything else (conv weights, ReLU masks): :func:`dualize`
  swaps every ``BatchNorm2d`` of a graph for one, :func:`route` picks the branch for a forward,
  :func:`collapse` puts a plain ``BatchNorm2d`` (one branch) back, which the lowering then folds into the conv.
* :func:`teacher_step` — the robust teacher's objective: TRADES (Zhang et al. 2019:
  ``CE(x) + β·KL(f(x_adv) ‖ f(x))``, ``x_adv`` maximising that KL) or PGD adversarial training
  (Madry: ``CE(x_adv)``), plus the AugMix JSD term.
* :func:`robust_kd_step` — the student's objective in the mask search and finetune: ``(1 − w)·CE(x) +
  w·(k_c·KD(s(x), t(x)) + k_n·KD(s(x_aug), t(x_aug)) + k_a·KD(s(x_adv), t(x_adv)))`` — three-way
  distillation of the clean, AugMix-corrupted and adversarial logits to the robust teacher's; the
  adversarial examples attack the student, the adversarial forwards run on the perturbed BN branch, the
  AugMix forwards on ``natural_branch`` (perturbed by default, as RLNet; ``clean`` trains the exported
  branch on them too).

The training attack is PGD L∞ in pixel space (:func:`relucomp.robustness.pgd_attack`) with few steps
(``robustness.train_attack_steps``; 2 on the ``quick`` effort) — cheap on CPU, weaker than the PGD-10 the
evaluation uses.  Both step functions plug into :func:`relucomp.train.train_loop` (they draw from torch's
global RNG, which the loop's checkpoints save, so a resume repeats the run).
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AUGMIX_OP_SETS
from .train import kd_loss, on_device

__all__ = ["augmix", "jsd_loss", "DualBatchNorm2d", "dualize", "collapse", "route", "RobustTrainSettings",
           "teacher_step", "robust_kd_step", "ROBUST_PRESETS"]

#: robust schedules of the ``--effort`` presets: (teacher adversarial-finetune epochs, training attack steps)
ROBUST_PRESETS: dict[str, tuple[int, int]] = {"quick": (2, 2), "standard": (5, 3), "paper": (100, 10)}


# --------------------------------------------------------------------------- AugMix

def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _sign(n: int) -> Tensor:
    return torch.where(torch.rand(n) < 0.5, -1.0, 1.0)


def _autocontrast(x: Tensor, m: Tensor) -> Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi - lo > 1e-3, (x - lo) / (hi - lo).clamp(min=1e-3), x)


def _posterize(x: Tensor, m: Tensor) -> Tensor:
    bits = (8 - (m * 4).round()).clamp(4, 8).view(-1, 1, 1, 1)      # 8..4 bits kept
    q = 2.0 ** (8 - bits)
    return torch.floor(x * 255 / q) * q / 255


def _solarize(x: Tensor, m: Tensor) -> Tensor:
    t = (1 - m).view(-1, 1, 1, 1)                                     # threshold 1 .. 0
    return torch.where(x >= t, 1 - x, x)


def _rotate(x: Tensor, m: Tensor) -> Tensor:
    a = m * math.radians(30) * _sign(len(m))
    c, s, z = torch.cos(a), torch.sin(a), torch.zeros_like(a)
    return _affine(x, torch.stack([torch.stack([c, -s, z], 1), torch.stack([s, c, z], 1)], 1))


def _shear(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    def op(x: Tensor, m: Tensor) -> Tensor:
        sh, one, z = m * 0.3 * _sign(len(m)), torch.ones_like(m), torch.zeros_like(m)
        rows = ([one, sh, z], [z, one, z]) if axis == 0 else ([one, z, z], [sh, one, z])
        return _affine(x, torch.stack([torch.stack(r, 1) for r in rows], 1))
    return op


def _translate(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    def op(x: Tensor, m: Tensor) -> Tensor:
        d, one, z = m * (2 / 3) * _sign(len(m)), torch.ones_like(m), torch.zeros_like(m)  # up to a third of the side
        rows = ([one, z, d], [z, one, z]) if axis == 0 else ([one, z, z], [z, one, d])
        return _affine(x, torch.stack([torch.stack(r, 1) for r in rows], 1))
    return op


AUGMIX_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "autocontrast": _autocontrast, "posterize": _posterize, "solarize": _solarize, "rotate": _rotate,
    "shear_x": _shear(0), "shear_y": _shear(1), "translate_x": _translate(0), "translate_y": _translate(1)}


# --------------------------------------------------------------------------- PRIME's primitives
# Modas et al., "PRIME: A few primitives can boost robustness to common corruptions" (ECCV 2022), with their
# CIFAR-10 ranges; every image draws its own parameters (the magnitude argument is not used).

def _prime_filter(x: Tensor, m: Tensor, sigma_max: float = 4.0) -> Tensor:
    """Spectral: a random 3×3 filter δ + σ·N(0, 1), σ ~ U(0, 4), the same for an image's three channels."""
    n, c, h, w = x.shape
    sigma = torch.rand(n, 1, 1) * sigma_max
    k = sigma * torch.randn(n, 3, 3)
    k[:, 1, 1] += 1.0
    out = F.conv2d(x.reshape(1, n * c, h, w), k.repeat_interleave(c, 0).unsqueeze(1), padding=1, groups=n * c)
    return out.reshape(n, c, h, w)


def _prime_color(x: Tensor, m: Tensor, cut_max: int = 100, t_max: float = 0.01) -> Tensor:
    """Colour: per channel a random smooth intensity curve v + Σ_{k ≤ cut} β_k·sin(kπv), β ~ N(0, T), cut ~
    U{1..100}, T ~ U(0, 0.01)."""
    n, c = x.shape[:2]
    freqs = torch.arange(1, cut_max + 1, dtype=x.dtype)
    keep = freqs.view(1, -1) <= torch.randint(1, cut_max + 1, (n, 1))                      # n x K
    beta = torch.randn(n, c, cut_max) * (torch.rand(n, 1, 1) * t_max).sqrt() * keep.unsqueeze(1)
    levels = 1024                                  # the curve tabulated, then read with linear interpolation
    grid = torch.linspace(0, 1, levels, dtype=x.dtype)
    curve = grid + torch.einsum("nck,kl->ncl", beta, torch.sin(math.pi * freqs.view(-1, 1) * grid))  # n x c x L
    pos = x.clamp(0, 1).flatten(2) * (levels - 1)
    lo = pos.floor().long().clamp(max=levels - 2)
    frac = pos - lo
    return ((1 - frac) * curve.gather(2, lo) + frac * curve.gather(2, lo + 1)).view_as(x)


def _prime_diffeo(x: Tensor, m: Tensor, cut_min: int = 2, cut_max: int = 100) -> Tensor:
    """Spatial: a random smooth deformation (Petrini et al.'s diffeomorphisms): displacement fields made of the
    sine modes (i, j) with √(i² + j²) < cut + ½, amplitude 1/√(i² + j²), at a temperature T between a
    half-pixel typical displacement and the largest without folds."""
    n, _, h, w = x.shape
    size = max(h, w)
    k = torch.arange(1, cut_max + 1, dtype=x.dtype)
    r = (k.view(-1, 1) ** 2 + k.view(1, -1) ** 2).sqrt()                                   # K x K
    top = torch.randint(cut_min + 1, cut_max + 1, (n,)).to(x.dtype)
    cut = (torch.distributions.Beta(0.5, 0.5).sample((n,)) * (top + 1 - cut_min) + cut_min).floor()
    log = torch.log(cut + 1e-6)
    t1, t2 = 1 / (math.pi * size ** 2 * log), 4 / (math.pi ** 3 * cut ** 2 * log)
    temp = t1 + torch.distributions.Beta(0.5, 0.5).sample((n,)) * (torch.maximum(t1, t2) - t1)
    energy = (r.unsqueeze(0) < cut.view(-1, 1, 1) + 0.5) / r                               # n x K x K
    sy = torch.sin(math.pi * torch.linspace(0, 1, h).view(-1, 1) * k)                       # h x K
    sx = torch.sin(math.pi * torch.linspace(0, 1, w).view(-1, 1) * k)                       # w x K
    field = lambda: torch.einsum("nij,xi,yj->nyx", torch.randn(n, cut_max, cut_max) * energy, sx, sy)  # noqa: E731
    scale = (temp.sqrt() * size).view(-1, 1, 1)
    dx, dy = scale * field(), scale * field()                                             # pixels
    gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
    px = ((gx - dx).clamp(0, w - 1) / max(w - 1, 1)) * 2 - 1
    py = ((gy - dy).clamp(0, h - 1) / max(h - 1, 1)) * 2 - 1
    return F.grid_sample(x, torch.stack([px, py], -1), mode="bilinear", align_corners=True)


PRIME_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "prime_filter": _prime_filter, "prime_color": _prime_color, "prime_diffeo": _prime_diffeo}

#: the op sets AugMix's chains may draw from (``robustness.augmix_ops``)
OP_SETS: dict[str, dict[str, Callable[[Tensor, Tensor], Tensor]]] = {
    "augmix": AUGMIX_OPS, "prime": PRIME_OPS, "augmix+prime": {**AUGMIX_OPS, **PRIME_OPS}}
assert set(OP_SETS) == set(AUGMIX_OP_SETS), "relucomp.config.AUGMIX_OP_SETS names the op sets the config accepts"


def augmix(x: Tensor, *, width: int = 3, max_depth: int = 3, severity: float = 0.3, alpha: float = 1.0,
           ops: str = "augmix") -> Tensor:
    """AugMix of pixel-space images ``x`` in [0, 1] (every image its own chains, weights and ops); ``ops`` names
    the op set of :data:`OP_SETS` (AugMix's own, PRIME's primitives, or both; the function's default is AugMix
    itself, the compile's is ``robustness.augmix_ops``)."""
    n, ops = x.shape[0], list(OP_SETS[ops].values())
    w = torch.distributions.Dirichlet(torch.full((width,), float(alpha))).sample((n,))        # n x width
    m = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,)).view(-1, 1, 1, 1)
    mix = torch.zeros_like(x)
    for i in range(width):
        depth = torch.randint(1, max_depth + 1, (n,))
        xi = x
        for k in range(max_depth):
            choice = torch.randint(0, len(ops), (n,))
            mag = torch.rand(n) * (severity - 0.1) + 0.1
            out = xi.clone()
            for j, op in enumerate(ops):
                sel = (choice == j) & (depth > k)
                if sel.any():
                    out[sel] = op(xi[sel], mag[sel]).clamp(0, 1)
            xi = out
        mix = mix + w[:, i].view(-1, 1, 1, 1) * xi
    return (m * x + (1 - m) * mix).clamp(0, 1)


def jsd_loss(*logits: Tensor) -> Tensor:
    """AugMix's Jensen-Shannon consistency: mean KL of each softmax to their mixture."""
    probs = [F.softmax(z, 1) for z in logits]
    log_m = torch.clamp(sum(probs) / len(probs), 1e-7, 1).log()
    return sum(F.kl_div(log_m, p, reduction="batchmean") for p in probs) / len(probs)


# --------------------------------------------------------------------------- dual BatchNorm

class DualBatchNorm2d(nn.Module):
    """Two BatchNorm2d branches (``clean``, ``perturbed``): own running statistics and affine, shared input."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.clean = copy.deepcopy(bn)
        self.perturbed = copy.deepcopy(bn)
        self.branch = "clean"

    def forward(self, x: Tensor) -> Tensor:
        return (self.clean if self.branch == "clean" else self.perturbed)(x)


def _swap(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def dualize(model: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` of ``model`` (in place) by a :class:`DualBatchNorm2d`; returns how many."""
    duals = {n for n, m in model.named_modules() if isinstance(m, DualBatchNorm2d)}
    names = [n for n, m in model.named_modules()
             if type(m) is nn.BatchNorm2d and n and n.rpartition(".")[0] not in duals]
    for n in names:
        _swap(model, n, DualBatchNorm2d(model.get_submodule(n)))
    return len(names)


def collapse(model: nn.Module, branch: str = "clean") -> int:
    """Put one branch of every :class:`DualBatchNorm2d` back as a plain ``BatchNorm2d`` (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, DualBatchNorm2d)]
    for n in names:
        _swap(model, n, getattr(model.get_submodule(n), branch))
    return len(names)


@contextlib.contextmanager
def route(model: nn.Module, branch: str) -> Iterator[None]:
    """Run the forwards inside on ``branch`` of every DualBatchNorm2d (no-op without any)."""
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm2d)]
    before = [m.branch for m in duals]
    for m in duals:
        m.branch = branch
    try:
        yield
    finally:
        for m, b in zip(duals, before):
            m.branch = b


# --------------------------------------------------------------------------- objectives

@dataclass(frozen=True)
class RobustTrainSettings:
    mean: Sequence[float]
    std: Sequence[float]
    epsilon: float = 8 / 255
    attack_steps: int = 2
    attack: str = "trades"              # trades | pgd (the teacher's objective)
    trades_beta: float = 6.0
    helper_weight: float = 0.0          # HAT's helper CE weight γ (0: off; needs the standard model, teacher_step)
    augmix: bool = True
    augmix_ops: str = "prime"           # the op set of the AugMix views (OP_SETS; PRIME's measured better here)
    jsd_weight: float = 48.0            # AugMix used 12; 48 measured better here (README: robust compile)
    kd_clean: float = 1.0
    kd_natural: float = 1.0
    kd_adv: float = 1.0
    student_jsd: float = 0.0            # the student's own AugMix JSD consistency weight (0: off)
    natural_branch: str = "perturbed"   # the DualBN branch the AugMix views run on (adversarial: always perturbed)

    @property
    def step_size(self) -> float:       # ε/steps·2.5 (Madry's rule of thumb), at most ε
        return min(self.epsilon, 2.5 * self.epsilon / max(1, self.attack_steps))


class _Pixels:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to01(self, x: Tensor) -> Tensor:
        return (x * self.std.to(x.device) + self.mean.to(x.device)).clamp(0, 1)

    def norm(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class _AttackBar:
    """A progress row showing the attack inside the training step."""

    def __init__(self, progress: Any, steps: int, what: str):
        self.prog = progress
        self.task = progress.add_task(f"  └ {what}", total=steps, info="") if progress is not None else None

    def __call__(self, i: int, loss: float) -> None:
        if self.task is not None:
            self.prog.update(self.task, completed=i, info=f"attack loss {loss:.3f}")

    def close(self) -> None:
        if self.task is not None:
            self.prog.remove_task(self.task)


def _attack(model: nn.Module, px: _Pixels, x01: Tensor, y: Tensor, s: RobustTrainSettings, bar: _AttackBar,
            loss: Callable | None = None) -> Tensor:
    from .robustness import Normalized, pgd_attack

    wrapped = Normalized(model, [float(v) for v in px.mean.flatten()], [float(v) for v in px.std.flatten()])
    wrapped.to(x01.device)
    return pgd_attack(wrapped, x01, y, epsilon=s.epsilon, step=s.step_size, steps=s.attack_steps, random_start=True,
                      loss=loss, on_step=bar)


HELPER_SCALE = 2.0                      # HAT's helper examples: x + 2·(x_adv − x)


def helper_examples(x01: Tensor, x_adv01: Tensor, scale: float = HELPER_SCALE) -> Tensor:
    """HAT's helper examples (pixel space): the adversarial perturbation extended ``scale`` times, clipped to
    [0, 1] — beyond the ε-ball, where the standard model's label marks how far the decision boundary may move."""
    return (x01 + scale * (x_adv01 - x01)).clamp(0, 1)


def teacher_step(s: RobustTrainSettings, *, progress: Any = None, helper: nn.Module | None = None,
                 distill: nn.Module | None = None):
    """The robust teacher's step: TRADES or PGD adversarial training, plus AugMix + JSD (a train_loop StepFn).

    ``s.helper_weight`` > 0 adds HAT's helper term (Rade & Moosavi-Dezfooli, "Reducing excessive margin to achieve
    a better accuracy vs. robustness trade-off", ICLR 2022): cross-entropy on the helper examples
    :func:`helper_examples` against the label ``helper`` (the standard, non-robust model; frozen, eval mode, on the
    step's device) gives to the adversarial example — adversarial training pushes the boundary further than
    robustness at ε needs, and that excess margin is what costs clean accuracy.

    On a dual-BN teacher (``robustness.clean_teacher = "dual"``, AdvProp's auxiliary BN, Xie et al. 2020) the clean
    forwards run on the ``clean`` branch and the adversarial and AugMix ones on ``perturbed``; on a plain model
    the routing is a no-op.

    ``distill`` (a robust model of the same task, frozen, eval mode, on the step's device; TRADES only): the robust
    term's target — what the attack pulls the output away from and the loss pulls it back to — is ``distill``'s
    clean output instead of the teacher's own, ``CE(f(x), y) + β·KL(f(x_adv) ‖ t(x))`` with ``x_adv`` maximising
    the KL: TRADES with a robust teacher's soft labels, as in robust distillation (ARD, Goldblum et al. 2020;
    RSLAD, Zi et al. 2021), keeping TRADES's label term."""
    if s.helper_weight > 0 and helper is None:
        raise ValueError("teacher_step: helper_weight > 0 needs the standard model (helper=)")
    if distill is not None and s.attack != "trades":
        raise ValueError("teacher_step: distill= needs the TRADES objective")
    px = _Pixels(s.mean, s.std)
    bar = _AttackBar(progress, s.attack_steps, f"PGD-{s.attack_steps} ({s.attack})")

    def step(model, x, y, g):
        x01 = px.to01(x)
        view = lambda: px.norm(augmix(x01, ops=s.augmix_ops))  # noqa: E731 - an AugMix view, normalised
        with route(model, "clean"):                            # no-op unless the teacher is dual-BN
            logits = model(x)
            if s.attack == "trades":
                with torch.no_grad():
                    p_clean = F.softmax((model if distill is None else distill)(x), 1)
        with route(model, "perturbed"):
            if s.attack == "trades":
                kl = lambda z, _y: F.kl_div(F.log_softmax(z, 1), p_clean, reduction="sum")  # noqa: E731
                x_adv = _attack(model, px, x01, y, s, bar, loss=kl)
                adv_logits = model(px.norm(x_adv))
                target = F.softmax(logits, 1) if distill is None else p_clean
                loss = F.cross_entropy(logits, y) + s.trades_beta * F.kl_div(
                    F.log_softmax(adv_logits, 1), target, reduction="batchmean")
            else:
                x_adv = _attack(model, px, x01, y, s, bar)
                loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(model(px.norm(x_adv)), y)
            if s.helper_weight > 0:                            # HAT: helper examples, the standard model's labels
                with torch.no_grad():
                    y_help = helper(px.norm(x_adv)).argmax(1)
                loss = loss + s.helper_weight * F.cross_entropy(model(px.norm(helper_examples(x01, x_adv))), y_help)
            if s.augmix and s.jsd_weight > 0:
                a1, a2 = model(view()), model(view())
                loss = loss + s.jsd_weight * jsd_loss(logits, a1, a2)
        return loss, logits

    step.bar = bar
    return step


def robust_kd_step(teacher: nn.Module, s: RobustTrainSettings, *, kd_weight: float, temperature: float,
                   extra: Callable | None = None, progress: Any = None, desc: str = "search",
                   clean_teacher: nn.Module | None = None, adv_teacher: nn.Module | None = None):
    """Three-way distillation step (clean / AugMix / adversarial logits to the robust teacher's); dual-BN aware.

    ``s.student_jsd`` > 0 adds AugMix's Jensen-Shannon consistency over the student's clean logits and two AugMix
    views (the first is the KD term's), weighted ``student_jsd``, as the teacher's step does with ``jsd_weight``.

    ``clean_teacher``: the clean term distils from this model instead — the dual-BN teacher's clean branch
    (``robustness.clean_teacher = "dual"``, the default) or the dense model before the adversarial finetune
    (``"dense"``, MTARD's clean teacher, Zhao et al. 2022); the AugMix and adversarial terms keep the robust
    ``teacher``.  ``adv_teacher``: the adversarial term distils from this model instead (``robustness.adv_teacher``:
    a second robust teacher, MTARD's split of the teachers by the inputs they see).

    The teachers are frozen; each is moved to the batch's device at its first use."""
    px = _Pixels(s.mean, s.std)
    bar = _AttackBar(progress if s.kd_adv > 0 else None,      # no attack, no row
                     s.attack_steps, f"PGD-{s.attack_steps} on the student ({desc})")

    def step(model, x, y, g):
        x01 = px.to01(x)
        view = lambda: px.norm(augmix(x01, ops=s.augmix_ops))  # noqa: E731 - an AugMix view, normalised
        logits = model(x)                                      # clean branch
        loss = (1 - kd_weight) * F.cross_entropy(logits, y)
        with torch.no_grad():
            t_clean = on_device(teacher if clean_teacher is None else clean_teacher, x.device)(x)
        kd = s.kd_clean * kd_loss(logits, t_clean, temperature) if s.kd_clean > 0 else 0.0
        jsd = s.augmix and s.student_jsd > 0
        if s.kd_natural > 0 or jsd:
            with route(model, s.natural_branch):
                xn = view() if s.augmix else x
                s_nat = model(xn)
                if s.kd_natural > 0:
                    with torch.no_grad():
                        t_nat = on_device(teacher, x.device)(xn)
                    kd = kd + s.kd_natural * kd_loss(s_nat, t_nat, temperature)
                if jsd:                                        # AugMix's consistency on the student: a 2nd view
                    loss = loss + s.student_jsd * jsd_loss(logits, s_nat, model(view()))
        with route(model, "perturbed"):
            if s.kd_adv > 0:
                xa = px.norm(_attack(model, px, x01, y, s, bar))
                with torch.no_grad():
                    t_adv = on_device(teacher if adv_teacher is None else adv_teacher, x.device)(xa)
                kd = kd + s.kd_adv * kd_loss(model(xa), t_adv, temperature)
        loss = loss + kd_weight * kd
        if extra is not None:
            loss = loss + extra(logits, y, g)
        return loss, logits

    step.bar = bar
    return step

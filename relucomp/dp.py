"""Differentially private finetuning (DP-SGD through opacus; Berrada et al.).

What is private.  The guarantee is (ε, δ)-DP *of the DP phases* with respect to
the training split (``bundle.train``): the finetune (``phase="finetune"``), the
mask search (``"search"``) or both (``"both"``: one accountant, σ calibrated for
the steps of both phases, so the composed ε ≤ target).  One image added or
removed changes the distribution of their output by at most (ε, δ).  What they
start from — the dense model (its weights are the starting point and, for KD,
the teacher) and, with ``phase="finetune"``, the ReLU masks — is treated as
**public**.  If the dense model was trained on the same images, or the masks
were searched on them without DP, the final model is *not* end-to-end private
for those images.  Validation/test splits are only read for reporting.

Pieces (all logic here; the ``dp_finetune`` stage only calls them):

* :func:`options` / :func:`check_dp_options` — the validated options for n
  training images (the rules: :func:`relucomp.config.check_dp`, also run by
  ``validate`` before anything is loaded).
* :func:`make_dp_compatible` — BatchNorm is not per-sample: each BN that
  follows a conv/linear is folded into it (``FoldBatchNormPass``, numerically
  identical, verified on a calibration batch, keeps the trained statistics);
  BN that cannot be folded is replaced by GroupNorm with opacus's
  ``ModuleValidator.fix`` (changes the function; reported); in-place ops on
  graph values become out-of-place when that is exact.  ReLU gates stay (their
  ``alpha`` and learned linear replacements are frozen, so opacus needs no per-sample gradient for them).
* :func:`plan` / :class:`DPPlan` — one privacy budget for every DP phase (q, steps, σ, accountant).
* :func:`dp_search` — the SNL gradual search under DP-SGD (a grad sampler for ``ReLUGate``).
* :func:`dp_finetune` — opacus ``GradSampleModule`` + ``DPOptimizer``
  (per-sample clipping to ``max_grad_norm``, Gaussian noise), Poisson sampling
  (opacus ``UniformWithReplacementSampler``), noise multiplier calibrated with
  ``get_noise_multiplier`` to reach ε after the planned steps, spent ε read
  back from the accountant (RDP by default, PRV optional), and an EMA of the
  weights (post-processing: free in privacy) with ``AveragedModel``.

CEAG / EL with DP is refused: their dual updates read per-group accuracy of
the training data every step and their primal term is a batch-level group
mean (not a per-sample loss), neither of which DP-SGD accounts for.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .config import CompileConfig, check_dp, load_config
from .errors import RelucompError
from .nn import ReLUGate
from .train import on_device

@dataclass
class DPOptions:
    """Validated DP options (see :func:`options`)."""

    epsilon: float
    delta: float
    max_grad_norm: float | str = 1.0    # "auto": placed by _dp_finetune from the validation split's norms
    phase: str = "finetune"
    accountant: str = "rdp"
    ema_decay: float = 0.99
    ema_warmup: bool = True
    n_train: int = 0
    augmult: int = 1


def options(cfg: CompileConfig, n_train: int) -> DPOptions | None:
    """The DP options of a validated config for ``n_train`` training images (``None``: DP off).

    The rules live in :func:`relucomp.config.check_dp` (run by ``validate``
    without n, and here, before any training, with it).
    """
    delta = check_dp(cfg, n_train)
    dp = cfg.dp
    if dp.epsilon is None:
        return None
    return DPOptions(epsilon=float(dp.epsilon), delta=float(delta),
                     max_grad_norm=("auto" if dp.max_grad_norm == "auto"
                                    else float(dp.max_grad_norm if dp.max_grad_norm is not None else 1.0)),
                     phase=dp.phase,
                     accountant=dp.accountant, ema_decay=float(cfg.finetune.ema_decay),
                     ema_warmup=cfg.finetune.ema_warmup is not False, n_train=int(n_train),
                     augmult=int(dp.augmult))


def check_dp_options(*, epsilon: float | None, delta: float | None = None, max_grad_norm: float | None = None,
                     phase: str = "finetune", export_weights: str | None = None, n_train: int,
                     fair_method: str | None = "nft", accountant: str = "rdp", sparsity: float | None = None,
                     ema_decay: float = 0.99, ema_warmup: bool | None = None, augmult: int = 1) -> DPOptions | None:
    """Keyword form of :func:`options` (library use without a CompileConfig); ``None`` when DP is off."""
    cfg = load_config({"dp": {"epsilon": epsilon, "delta": delta, "max_grad_norm": max_grad_norm, "phase": phase,
                              "accountant": accountant, "augmult": augmult},
                       "fairness": {"method": fair_method}, "pruning": {"sparsity": sparsity},
                       "export": {"weights": export_weights},
                       "finetune": {"ema_decay": ema_decay, "ema_warmup": ema_warmup}})
    return options(cfg, n_train)


# ---------------------------------------------------------------------------
# model conversion
# ---------------------------------------------------------------------------

_INPLACE_FN = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
               operator.itruediv: operator.truediv, torch.relu_: torch.relu}
_INPLACE_METHODS = {"add_", "sub_", "mul_", "div_", "clamp_", "relu_", "sigmoid_", "tanh_", "neg_", "abs_",
                    "clamp_min_", "clamp_max_"}


def _opacus_errors(gm: nn.Module) -> list[tuple[str, str]]:
    """(layer name, first sentence of opacus's reason) for every trainable module opacus refuses."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    out = []
    for name, m in trainable_modules(gm):
        if isinstance(m, ReLUGate):
            continue
        check = ModuleValidator.VALIDATORS.get(type(m))
        for err in (check(m) if check is not None else []):
            msg = str(err).strip().splitlines()[0].split(". ")[0].rstrip(".")
            out.append((name, f"{type(m).__name__}: {msg}"))
    return out


def _replace_inplace(gm: fx.GraphModule) -> list[str]:
    """In-place graph ops → out-of-place when the mutated value has no later reader."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changes = []
    for node in list(gm.graph.nodes):
        is_fn = node.op == "call_function" and node.target in _INPLACE_FN
        is_m = node.op == "call_method" and node.target in _INPLACE_METHODS
        if not (is_fn or is_m):
            continue
        src = node.args[0] if node.args else None
        if isinstance(src, fx.Node):
            later = [u for u in src.users if u is not node and order[u] > order[node]]
            if later or src.op == "placeholder":
                raise RelucompError(
                    f"in-place op {node.name} ({node.target if is_m else node.target.__name__}) mutates a value that "
                    "is read again later; opacus's per-sample hooks cannot handle it",
                    "write that operation out of place in the model (e.g. `out = out + x` instead of `out += x`)")
        if is_fn:
            node.target = _INPLACE_FN[node.target]
        else:
            node.target = node.target[:-1]
        changes.append(f"in-place {node.name} → out-of-place")
    if changes:
        gm.graph.lint()
        gm.recompile()
    for name, m in gm.named_modules():
        if getattr(m, "inplace", False) and isinstance(getattr(m, "inplace"), bool):
            m.inplace = False
            changes.append(f"{name}: inplace=False")
    return changes


def make_dp_compatible(gm: fx.GraphModule, calib: torch.Tensor) -> tuple[fx.GraphModule, list[str]]:
    """Make the gated graph trainable by opacus; returns ``(gm, changes)``.

    BatchNorm after a conv/linear is folded (exact, verified on ``calib``); other
    BatchNorm → GroupNorm (``ModuleValidator.fix``, changes the function);
    in-place ops → out-of-place.  Anything opacus still refuses is a
    :class:`RelucompError` naming the layer.
    """
    from opacus.validators import ModuleValidator

    from .infra import PassManager
    from .passes.fold_bn import FoldBatchNormPass

    changes: list[str] = []
    gm.eval()
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    if n_bn:
        pm = PassManager([FoldBatchNormPass()], calibration=calib)
        res = pm.run(gm)
        gm = res.gm
        folded = res.stats["passes"][0]["stats"].get("folded", 0)
        if folded:
            changes.append(f"folded {folded} BatchNorm layer(s) into the preceding conv/linear (exact)")
    with torch.no_grad():
        ref = gm(calib)
    changes += _replace_inplace(gm)
    left = [n for n, m in gm.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        fixed = ModuleValidator.fix(gm)
        for n in left:
            parent, _, attr = n.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attr, fixed.get_submodule(n))
        changes.append(f"replaced {len(left)} BatchNorm layer(s) that could not be folded by GroupNorm "
                       f"({', '.join(left[:4])}{'...' if len(left) > 4 else ''}); trained statistics are lost")
    else:
        with torch.no_grad():
            out = gm(calib)
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-4):
            raise RuntimeError("relucomp bug: DP conversion changed the model's outputs")
    errs = _opacus_errors(gm)
    if errs:
        layer, msg = errs[0]
        raise RelucompError(f"opacus cannot train layer {layer!r} with per-sample gradients: {msg}",
                            "replace that layer with a supported one (conv/linear/norm layers without running "
                            "statistics), freeze its parameters, or drop --dp-epsilon")
    return gm, changes


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------

def _per_sample(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(N, *act) → (N, *shape): sum one sample's gradient over the dims a gate parameter broadcasts over."""
    return t.unsqueeze(1).sum_to_size(t.shape[0], *shape)


def _gate_grad_sample(layer: ReLUGate, activations, backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a ReLU gate's trainable parameters (``alpha``; ``rep_scale``/``rep_shift``).

    The forward (see :class:`relucomp.nn.ReLUGate`) is ``y = lin + a·(relu(x) − lin)`` with
    ``lin = s·x + b`` (``lin = x`` for the identity replacement) and ``a`` the effective gate value
    (straight-through: ``∂a/∂alpha = 1``); hard gates ``y = where(mask, relu(x), lin)``.
    """
    x = activations[0]
    go = backprops
    affine = layer.rep_scale.requires_grad or layer.has_replacement()
    s, b = layer.rep_scale, layer.rep_shift
    if x.dim() != s.dim():
        s, b = s.reshape(1, -1), b.reshape(1, -1)
    lin = torch.addcmul(b, s, x) if affine else x
    if bool(layer.hard) or not layer.alpha.requires_grad:
        a = layer.mask if bool(layer.hard) else layer.alpha.detach().clamp(0.0, 1.0) * layer.mask
    else:
        a = layer.mask if layer.straight else layer.alpha.detach().clamp(0.0, 1.0) * layer.mask
    out = {}
    if layer.alpha.requires_grad and not bool(layer.hard):
        out[layer.alpha] = _per_sample(go * (torch.relu(x) - lin), layer.alpha.shape)
    if layer.rep_scale.requires_grad:
        w = go * (1.0 - a)
        out[layer.rep_scale] = _per_sample(w * x, layer.rep_scale.shape)
        out[layer.rep_shift] = _per_sample(w, layer.rep_shift.shape)
    return out


_SAMPLER_REGISTERED = False


def register_gate_sampler() -> None:
    """Teach opacus the per-sample gradient of :class:`ReLUGate` (needed when its parameters train under DP)."""
    global _SAMPLER_REGISTERED
    if not _SAMPLER_REGISTERED:
        from opacus.grad_sample.utils import register_grad_sampler

        register_grad_sampler(ReLUGate)(_gate_grad_sample)
        _SAMPLER_REGISTERED = True


@dataclass
class DPPlan:
    """One privacy budget for every DP phase: a shared sampling rate, step counts, noise multiplier and accountant.

    σ is calibrated (``get_noise_multiplier``) so that the accountant reaches ε
    after ``search_steps + finetune_steps`` steps at rate ``sample_rate``; both
    phases feed the same accountant, so the ε it reports covers both.
    """

    sample_rate: float
    batch_size: int
    search_steps: int
    finetune_steps: int
    sigma: float
    accountant: Any = None
    phases: dict[str, Any] = field(default_factory=dict)   # per-phase report (steps, ε after the phase)
    conversion: list[str] = field(default_factory=list)    # make_dp_compatible's changes before the first phase

    @property
    def steps(self) -> int:
        return self.search_steps + self.finetune_steps


def plan_state(dplan: DPPlan) -> dict[str, Any]:
    """The plan as plain data (checkpoints; the accountant's history is saved with the loop)."""
    return {"sample_rate": dplan.sample_rate, "batch_size": dplan.batch_size, "search_steps": dplan.search_steps,
            "finetune_steps": dplan.finetune_steps, "sigma": dplan.sigma, "phases": dict(dplan.phases),
            "conversion": list(dplan.conversion)}


def plan_from_state(d: dict[str, Any], opts: DPOptions, accountant_history: list | None = None) -> DPPlan:
    """Rebuild a :class:`DPPlan` saved with :func:`plan_state` (and its accountant's history)."""
    acc = make_accountant(opts.accountant)
    acc.history = [tuple(h) for h in (accountant_history or [])]
    return DPPlan(sample_rate=float(d["sample_rate"]), batch_size=int(d["batch_size"]),
                  search_steps=int(d["search_steps"]), finetune_steps=int(d["finetune_steps"]),
                  sigma=float(d["sigma"]), accountant=acc, phases=dict(d.get("phases") or {}),
                  conversion=list(d.get("conversion") or []))


def make_accountant(kind: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    return RDPAccountant() if kind == "rdp" else PRVAccountant()


def plan(opts: DPOptions, n: int, *, batch_size: int, search_epochs: int = 0, finetune_epochs: int = 0) -> DPPlan:
    """The privacy plan for ``n`` training images: Poisson rate q = batch/n, steps per phase, σ for ε over all steps.

    ``search_epochs`` counts only with ``opts.phase`` in (search, both), ``finetune_epochs`` with (finetune, both).
    """
    batch_size = max(1, min(int(batch_size), n))
    q = batch_size / n
    per_epoch = max(1, round(1 / q))
    s_steps = max(0, int(search_epochs)) * per_epoch if opts.phase in ("search", "both") else 0
    f_steps = max(0, int(finetune_epochs)) * per_epoch if opts.phase in ("finetune", "both") else 0
    total = s_steps + f_steps
    sigma = noise_for(opts, q, total) if total else 0.0
    return DPPlan(sample_rate=q, batch_size=batch_size, search_steps=s_steps, finetune_steps=f_steps, sigma=sigma,
                  accountant=make_accountant(opts.accountant), phases={"delta": opts.delta, "n_train": n})


def dp_search(*args, **kwargs) -> dict:
    """SNL mask search under DP-SGD; see :func:`_dp_search`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return _dp_search(*args, **kwargs)


def _dp_search(gm: fx.GraphModule, train_ds, opts: DPOptions, dplan: DPPlan, *, budget: int,
               teacher: nn.Module | None = None, lr: float = 0.01, alpha_lr: float = 0.02, lam: float = 1.0,
               kd_weight: float = 0.5, temperature: float = 4.0, warmup: float = 0.15, reach: float = 0.6,
               hysteresis: float = 0.05, seed: int = 0, augment: bool = True, progress: Any | None = None,
               log: Callable[[str], None] | None = None, device: str = "cpu") -> dict:
    """The SNL gradual search (:class:`relucomp.passes.snl_search.SNLSearchPass`'s schedule) under DP-SGD.

    ``gm`` must already be DP-compatible (:func:`make_dp_compatible`).  Weights, gate scores ``alpha``
    and (affine) linear replacements train on the per-sample loss ``(1−w)·CE + w·KD`` with opacus:
    per-sample gradients (a grad sampler for :class:`ReLUGate`), joint clipping to C, Gaussian noise σ
    of ``dplan``, Poisson batches at ``dplan.sample_rate``, ``dplan.search_steps`` steps, every step
    recorded in ``dplan.accountant``.  Everything else only post-processes DP outputs: the L1 pull on
    ``alpha`` (data-independent, applied as a separate step after the noisy update), pinning to the
    geometric schedule by the scores ``alpha``, the recovery plateau, and the final exact top-k
    binarization to ``budget`` (never above).  The pass's discrete refinement is **not** run under DP
    (it measures the loss on training batches without noise).  Returns the search stats.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from .passes.insert_gates import gates_of
    from .passes.snl_search import _costs, _flat, _scatter_mask, binarize_to_budget, select_live, soft_count

    say = log or (lambda s: None)
    register_gate_sampler()
    gates = gates_of(gm)
    soft = [g for g in gates.values() if not bool(g.hard)]
    total = sum(g.total_relus for g in gates.values())
    steps = dplan.search_steps
    q, sigma = dplan.sample_rate, dplan.sigma
    say(f"DP-SGD mask search: {steps} steps, q={q:.4f}, σ={sigma:.3f}, C={opts.max_grad_norm:g}")
    for g in soft:
        g.alpha.requires_grad_(True)
    gate_params = [g.alpha for g in soft]
    gate_ids = {id(p) for p in gate_params}
    weights = [p for p in gm.parameters() if p.requires_grad and id(p) not in gate_ids]
    gm.to(device).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # strict=False: opacus refuses any trainable layer with buffers (for BatchNorm's running statistics);
        # a gate's buffers (mask, hard) are never written by its forward — only by pinning, post-processing.
        # Every other layer was checked by make_dp_compatible (_opacus_errors).
        gsm = GradSampleModule(gm, batch_first=True, loss_reduction="sum", strict=False)
        # one optimizer, two groups: every sample's gradient is clipped jointly (weights + gate scores)
        # (the gate group has lr 0 here: its privatized gradient, left in .grad by DPOptimizer, drives an
        # Adam step as in the non-private search — post-processing, no extra privacy cost)
        base = torch.optim.SGD([{"params": weights, "lr": lr, "momentum": 0.9, "nesterov": True},
                                {"params": gate_params, "lr": 0.0}])
        opt = DPOptimizer(base, noise_multiplier=sigma, max_grad_norm=opts.max_grad_norm,
                          expected_batch_size=dplan.batch_size, loss_reduction="mean",
                          generator=torch.Generator(device=device).manual_seed(seed + 11))
    opt_a = torch.optim.Adam(gate_params, lr=alpha_lr) if gate_params else None
    opt.attach_step_hook(dplan.accountant.get_optimizer_hook_fn(sample_rate=q))
    loader = PoissonLoader(train_ds, sample_rate=q, steps=steps, augment=augment, seed=seed + 7,
                           augmult=opts.augmult) if steps else []
    warm_steps = int(round(warmup * steps))
    reach_steps = max(warm_steps + 1, int(round(reach * steps)))
    costs = _costs(soft) if soft else torch.zeros(0)
    tie = torch.rand(costs.numel(), generator=torch.Generator().manual_seed(seed)) * 1e-6
    cost = {id(g): g.elements_per_gate / total for g in soft}

    def target(step: int) -> float:
        if step <= warm_steps:
            return float(total)
        frac = min(1.0, (step - warm_steps) / max(1, reach_steps - warm_steps))
        return total * (max(budget, 1) / total) ** frac

    task = progress.add_task("dp-search", total=steps, info="") if progress is not None else None
    trace, history, reopened = [], [], 0
    tot = seen = 0.0
    for step, (x, y, _g) in enumerate(loader, 1):
        x, y = x.to(device), y.to(device)
        logits, loss = _dp_step(gsm, opt, teacher, x, y, kd_weight, temperature, augmult=opts.augmult)
        if opt_a is not None:
            opt_a.step()
        with torch.no_grad():  # the L1 pull on the scores: no data, no privacy cost
            for g in soft:
                g.alpha.sub_(alpha_lr * lam * cost[id(g)])
            plateau = step >= reach_steps
            for g in soft:
                g.straight = plateau
                g.clamp_()
            live_now = _flat(soft, lambda g: g.mask) > 0.5
            k = target(step)
            if k < total:
                scores = _flat(soft, lambda g: g.alpha.detach()) + hysteresis * live_now.float() + tie
                live = select_live(scores, costs, k)
                reopened += int((live & ~live_now).sum())
                _scatter_mask(soft, live, hard=False)
        cnt = soft_count(soft)
        trace.append([step, cnt, round(k)])
        tot += float(loss.detach())
        seen += int(y.numel())
        if progress is not None:
            progress.update(task, advance=1, info=f"loss {tot / max(seen, 1):.3f} relus {cnt:,}")
    _release_opacus(gsm, gm)
    for g in soft:
        g.straight = False
    gm.cpu()
    soft_final = soft_count(soft)
    gen = torch.Generator().manual_seed(seed)
    scores = {}
    for name, g in gates.items():
        a = g.alpha.detach().float()
        scores[name] = (g.mask * 10.0 + a + torch.rand(a.shape, generator=gen) * 1e-6) if not bool(g.hard) \
            else g.mask.float()
    kept = binarize_to_budget(gates, budget, scores=scores)
    eps = _spent(dplan.accountant, opts.delta, sigma) if steps else 0.0
    history.append({"step": steps, "loss": tot / max(seen, 1) if seen else None, "soft_relus": soft_final,
                    "epsilon": None if math.isinf(eps) else eps})
    dplan.phases["search"] = {"steps": steps, "epsilon_after": None if math.isinf(eps) else eps,
                              "loss": tot / max(seen, 1) if seen else None, "history": history}
    return {"budget": budget, "total_relus": total, "soft_relus_at_end": soft_final, "hard_relus": kept,
            "reached_budget_softly": soft_final <= budget, "warmup_steps": warm_steps, "reach_steps": reach_steps,
            "total_steps": steps, "reopened": reopened, "refine": {"rounds": 0, "swaps": 0, "skipped": "DP"},
            "kept_per_layer": {n: g.kept_relus() for n, g in gates.items()}, "warnings": [],
            "dp": True, "history": history, "lambda_trace": trace[-200:]}


class PoissonLoader:
    """Poisson-sampled batches ``(x, y, g)`` cut from a GroupedDataset's tensors.

    Each step every training image is included independently with probability
    ``sample_rate`` (opacus's ``UniformWithReplacementSampler``), as the
    accountant assumes; batches are augmented per batch like
    :class:`relucomp.loaders.BatchLoader`.  Empty batches are yielded (shape 0).

    ``augmult`` = K > 1 (augmentation multiplicity, De et al. 2022): every sampled
    image appears K times in ``x``, each copy its own random crop/flip (copies of an
    image are adjacent: ``x`` is ``(B·K, ...)``, ``y`` and ``g`` stay ``(B,)``);
    :func:`_dp_step` averages each image's K per-sample gradients before clipping.
    """

    def __init__(self, dataset, *, sample_rate: float, steps: int, augment: bool = True, seed: int = 0,
                 augmult: int = 1):
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        self.dataset = dataset
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                                     generator=self.generator, steps=steps)
        self.augment = augment
        self.augmult = int(augmult)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        from .data.transforms import normalize, random_crop_flip_batch

        ds = self.dataset
        for idx in self.sampler:
            idx = torch.as_tensor(idx, dtype=torch.long)
            x = ds.images[idx].to(torch.float32).div_(255.0)
            if self.augmult > 1:
                x = x.repeat_interleave(self.augmult, 0)
            if self.augment and idx.numel():
                x = random_crop_flip_batch(x, ds.padding, generator=self.generator)
            yield normalize(x, ds.mean, ds.std), ds.labels[idx], ds.groups[idx]


def per_sample_loss(logits, y, teacher_logits=None, *, kd_weight: float = 0.5, temperature: float = 4.0):
    """Sum over the batch of ``(1-w)·CE_i + w·T²·KL_i`` (each term is one sample's)."""
    ce = F.cross_entropy(logits, y, reduction="none")
    if teacher_logits is None or kd_weight <= 0:
        return ce.sum()
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="none",
                  log_target=True).sum(1) * t * t
    return ((1 - kd_weight) * ce + kd_weight * kl).sum()


def _release_opacus(gsm, gm) -> None:
    """Remove opacus's hooks and per-sample state from ``gm`` (a plain module again)."""
    gsm._close()
    for p in gm.parameters():
        for attr in ("grad_sample", "summed_grad", "_forward_counter"):
            if hasattr(p, attr):
                delattr(p, attr)
        p.grad = None


def average_augmult(params, k: int) -> None:
    """Augmentation multiplicity: replace every ``p.grad_sample`` of ``(B·K, ...)`` (K adjacent copies of each
    image) by the mean over each image's K copies, ``(B, ...)`` — one gradient per sampled image, which the
    optimizer then clips to C, so each image's contribution (the sensitivity) is unchanged."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            continue
        if isinstance(gs, list):  # opacus keeps a list when a batch ran several forwards
            gs = torch.cat(gs, 0)
        if gs.shape[0] % k:
            raise RuntimeError(f"bug: {gs.shape[0]} per-sample gradients are not a multiple of augmult {k}")
        p.grad_sample = gs.reshape(gs.shape[0] // k, k, *gs.shape[1:]).mean(1)


def _dp_step(gsm, opt, teacher, x, y, kd_weight, temperature, sample_weights=None, augmult: int = 1):
    """One DP-SGD step on a Poisson batch: (1 − w)·CE + w·KD per sample, clipped and noised by ``opt``.

    ``sample_weights`` (N,) in [0, 1]: each sample's clipped gradient is scaled by its weight before the
    noise (:func:`relucomp.dp_fairness.weight_grad_samples`; the sensitivity stays ``C``).
    ``augmult`` K > 1: ``x`` holds K augmented copies of each of the N images (adjacent,
    :class:`PoissonLoader`); their per-sample gradients are averaged per image before the clipping
    (:func:`average_augmult`).  Returns the logits of each image's first copy (N rows) and the loss.
    """
    t_logits = None
    yk = y.repeat_interleave(augmult) if augmult > 1 else y
    if teacher is not None and kd_weight > 0 and y.numel():
        with torch.no_grad():
            t_logits = on_device(teacher, x.device)(x)
    logits = gsm(x)
    loss = per_sample_loss(logits, yk, t_logits, kd_weight=kd_weight, temperature=temperature)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if augmult > 1:
        average_augmult(opt.params, augmult)
        logits = logits[::augmult]
    if sample_weights is not None:
        from .dp_fairness import weight_grad_samples

        weight_grad_samples(opt.params, sample_weights, opt.max_grad_norm)
    opt.step()
    return logits, (loss.detach() / augmult if augmult > 1 else loss)  # the loss summed per image


def per_sample_grad_norms(params: Sequence[nn.Parameter]) -> torch.Tensor | None:
    """The L2 norm of each sample's whole gradient (over ``params``) from opacus's ``p.grad_sample``; ``None``
    when no per-sample gradient is held."""
    gs = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    if not gs or gs[0].shape[0] == 0:
        return None
    return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in gs], dim=1).norm(2, dim=1)


HELDOUT_NORM_IMAGES = 512  # validation images whose per-sample gradient norms the DP report describes
AUTO_CLIP_QUANTILE = 0.8  # --dp-max-grad-norm auto: C at this quantile of the validation per-sample norms


def _no_heldout() -> RelucompError:
    return RelucompError("--dp-max-grad-norm auto needs a validation split with images, and there is none",
                         "give a number, e.g. --dp-max-grad-norm 1.0")


def _clear_grad_samples(params) -> None:
    for p in params:
        p.grad_sample = None
        p.grad = None


def heldout_grad_norms(gsm, params, teacher, ds, *, kd_weight: float, temperature: float,
                       max_grad_norm: float | str, device: str = "cpu", max_images: int = HELDOUT_NORM_IMAGES,
                       batch: int = 128) -> dict | None:
    """Per-sample gradient norms of the DP loss at the starting weights on a held-out split (the validation
    split, read outside DP-SGD like CEAG-under-DP's duals; it never reaches the weights): quantiles and the
    share of images a clipping norm ``max_grad_norm`` would clip.  Tells whether C clips nearly everything
    (C far below the norms: every sample normalized, the clipping bias against hard groups) or nothing.
    ``max_grad_norm = "auto"``: C is placed at the :data:`AUTO_CLIP_QUANTILE` quantile of these norms (the
    returned ``max_grad_norm``; ``"auto": True``).  ``None`` for an empty split.  Clears the per-sample
    gradients it made (``params``: the GradSampleModule's trainable parameters)."""
    n = min(len(ds), int(max_images))
    if n == 0:
        return None
    from .data.transforms import normalize

    idx = torch.linspace(0, len(ds) - 1, n).round().long()  # spread over the split, deterministic
    norms = []
    for i in range(0, n, batch):  # the images as they are (no crop / flip, whatever the dataset's train flag)
        j = idx[i:i + batch]
        x = normalize(ds.images[j].float() / 255.0, ds.mean, ds.std).to(device)
        y = ds.labels[j].to(device)
        t_logits = None
        if teacher is not None and kd_weight > 0:
            with torch.no_grad():
                t_logits = on_device(teacher, x.device)(x)
        _clear_grad_samples(params)
        per_sample_loss(gsm(x), y, t_logits, kd_weight=kd_weight, temperature=temperature).backward()
        v = per_sample_grad_norms(params)
        if v is not None:
            norms.append(v.detach().cpu())
    _clear_grad_samples(params)
    if not norms:
        return None
    v = torch.cat(norms).double()
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    auto = max_grad_norm == "auto"
    c = float(torch.quantile(v, AUTO_CLIP_QUANTILE)) if auto else float(max_grad_norm)
    return {"split": "val", "images": int(v.numel()),
            "quantiles": {f"p{int(q * 100)}": float(torch.quantile(v, q)) for q in qs},
            "max_grad_norm": c, "auto": auto, "clipped_share": float((v > c).double().mean())}


@dataclass
class DPResult:
    model: fx.GraphModule          # last iterate
    ema: fx.GraphModule | None     # averaged weights
    report: dict[str, Any] = field(default_factory=dict)


def noise_for(opts: DPOptions, sample_rate: float, steps: int) -> float:
    """Noise multiplier reaching ``opts.epsilon`` after ``steps`` at ``sample_rate`` (0 for ε = ∞)."""
    if math.isinf(opts.epsilon):
        return 0.0
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=opts.epsilon, target_delta=opts.delta, sample_rate=sample_rate,
                                      steps=steps, accountant=opts.accountant, epsilon_tolerance=0.01,
                                      **_eps_kwargs(opts.accountant)))


def dp_finetune(*args, **kwargs) -> DPResult:
    """DP-SGD finetune of the gated graph ``gm`` (masks fixed) on ``train_ds``; see :func:`_dp_finetune`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")  # inputs need no grad: expected
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # RDP bound is just looser
        return _dp_finetune(*args, **kwargs)


def _dp_finetune(gm: fx.GraphModule, train_ds, opts: DPOptions, *, calib: torch.Tensor,
                teacher: nn.Module | None = None, epochs: int = 3, batch_size: int = 256, lr: float | None = 0.01,
                momentum: float = 0.9, kd_weight: float = 0.5, temperature: float = 4.0, seed: int = 0,
                ema: bool = True, augment: bool = True, progress: Any | None = None, log: Callable[[str], None] | None = None,
                device: str = "cpu", convert: bool = True, dplan: DPPlan | None = None,
                checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
                fair: Any | None = None, heldout: Any | None = None) -> DPResult:
    """DP-SGD finetune of the gated graph ``gm`` (masks fixed) on ``train_ds``.

    ``fair`` (a :class:`relucomp.dp_fairness.HeldOutDuals`): CEAG under DP — multipliers from a held-out
    split, per-sample weights on the clipped gradients (the privacy accounting is unchanged).
    ``heldout`` (the validation split): the report's ``heldout_grad_norms`` (:func:`heldout_grad_norms`),
    measured before the first step; with ``opts.max_grad_norm == "auto"`` C is placed from them.
    ``lr=None``: the DP recipe's LR for the expected batch and C (:func:`relucomp.recipe.dp_finetune_lr`).

    ``checkpoint(state)`` is called after every epoch with the whole loop state (weights, optimizer
    momentum, LR schedule, EMA, the accountant's history, the Poisson-sampling and noise generators,
    the step, the plan); ``resume=state`` continues from it and repeats the uninterrupted run step for
    step (same batches, same noise), and the accountant continues from the saved history, so no step
    is counted twice or lost.  Steps after the last checkpoint of an interrupted run are redone with the
    same randomness: the released model is the uninterrupted run's.

    Returns the last iterate, the EMA model and the privacy report
    (ε spent from the accountant, δ, noise multiplier, clipping norm, sampling
    rate, expected batch size, steps, conversion changes).
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from .train import averaged

    say = log or (lambda s: None)
    changes: list[str] = []
    if convert:
        gm, changes = make_dp_compatible(gm, calib)
    for m in gm.modules():
        if isinstance(m, ReLUGate):  # the gates (and their learned linear replacements) stay as the search left them
            for p in (m.alpha, getattr(m, "rep_scale", None), getattr(m, "rep_shift", None)):
                if p is not None:
                    p.requires_grad_(False)
    n = len(train_ds)
    if dplan is None:  # finetune-only DP: the plan covers this phase alone
        dplan = plan(opts, n, batch_size=batch_size, finetune_epochs=epochs)
    batch_size, q, sigma = dplan.batch_size, dplan.sample_rate, dplan.sigma
    dplan.conversion = list(dplan.conversion) + [c for c in changes if c not in dplan.conversion]
    changes = list(dplan.conversion)  # conversions of an earlier DP phase (or a resumed run) included
    steps_per_epoch = max(1, round(1 / q))
    steps = dplan.finetune_steps
    if fair is not None:
        fair.set_epoch_length(steps_per_epoch)
    ema = ema and steps > 0
    if opts.max_grad_norm == "auto" and heldout is None and resume is None:
        raise _no_heldout()

    gm.to(device).train()
    avg = averaged(gm, decay=opts.ema_decay, warmup=opts.ema_warmup) if ema else None
    params = [p for p in gm.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(gm, batch_first=True, loss_reduction="sum", strict=True)
    # the validation split's per-sample gradient norms at the start (a resumed run keeps the first run's)
    norms = resume.get("heldout_grad_norms") if resume is not None else None
    if heldout is not None and resume is None:
        norms = heldout_grad_norms(gsm, params, teacher, heldout, kd_weight=kd_weight, temperature=temperature,
                                   max_grad_norm=opts.max_grad_norm, device=device)
    if opts.max_grad_norm == "auto":
        if norms is None:
            _release_opacus(gsm, gm)
            raise _no_heldout()
        opts = replace(opts, max_grad_norm=float(norms["max_grad_norm"]))
    if lr is None:  # the DP recipe's LR, per unit of clipping norm
        from .recipe import dp_finetune_lr

        lr = dp_finetune_lr(batch_size, opts.max_grad_norm)
    if norms is not None:
        say(f"DP-SGD: per-sample gradient norms on the validation split p10/p50/p90 "
            f"{norms['quantiles']['p10']:.3g}/{norms['quantiles']['p50']:.3g}/{norms['quantiles']['p90']:.3g}; "
            f"C={opts.max_grad_norm:.3g}{' (auto)' if norms.get('auto') else ''} clips "
            f"{100 * norms['clipped_share']:.0f} %")
    say(f"DP-SGD: ε={opts.epsilon:g}, δ={opts.delta:.2g}, C={opts.max_grad_norm:g}, q={q:.4f}, "
        f"{steps} steps, noise multiplier σ={sigma:.3f}, lr={lr:.3g}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)
        # per-sample grads of a *summed* loss (GradSampleModule "sum"); the optimizer's "mean" divides
        # sum_i clip(g_i) + noise by the expected batch size (Poisson batches vary in size)
        opt = DPOptimizer(base, noise_multiplier=sigma, max_grad_norm=opts.max_grad_norm,
                          expected_batch_size=batch_size, loss_reduction="mean",
                          generator=torch.Generator(device=device).manual_seed(seed + 1))
    accountant = dplan.accountant  # shared with a DP mask search before this phase (one budget)
    opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=steps)
    loader = PoissonLoader(train_ds, sample_rate=q, steps=steps, augment=augment, seed=seed,
                           augmult=opts.augmult) if steps else []
    history: list[dict] = []
    start = 0
    if resume is not None:
        gm.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if avg is not None and resume.get("ema") is not None:
            avg.load_state_dict(resume["ema"])
        accountant.history = [tuple(h) for h in resume["accountant"]]
        start = int(resume["step"])
        if steps:
            loader.generator.set_state(resume["sampler"])
            loader.sampler.steps = steps - start
        opt.generator.set_state(resume["noise"])
        history = list(resume.get("history", []))
        if fair is not None and resume.get("fair") is not None:
            fair.load_state_dict(resume["fair"])
        say(f"DP-SGD: resumed at step {start}/{steps} (ε so far {_spent(accountant, opts.delta, sigma):.3f})")

    def save(step: int) -> None:
        if checkpoint is None:
            return
        checkpoint({"phase": "dp_finetune", "step": step, "model": gm.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "ema": avg.state_dict() if avg is not None else None,
                    "accountant": [list(h) for h in accountant.history], "sampler": loader.generator.get_state(),
                    "noise": opt.generator.get_state(), "history": history, "plan": plan_state(dplan),
                    "fair": fair.state_dict() if fair is not None else None, "heldout_grad_norms": norms})

    prog = progress
    task = prog.add_task("dp-finetune", total=steps, completed=start, info="") if prog is not None else None
    t0 = time.perf_counter()
    try:
        _dp_steps(loader, start, steps, steps_per_epoch, gsm, gm, opt, sched, avg, teacher, kd_weight, temperature,
                  device, prog, task, history, accountant, opts, sigma, t0, save, fair)
    except KeyboardInterrupt:
        gsm._close()
        from .errors import Interrupted

        last = history[-1]["step"] if history else start
        if checkpoint is None:
            raise Interrupted("interrupted during the DP finetune; nothing saved (no output directory)",
                              "run again with --out DIR to be able to resume") from None
        raise Interrupted(f"interrupted during the DP finetune; state saved at step {last}/{steps} (accountant "
                          "history included)", "run the same command again with --resume to continue") from None
    _release_opacus(gsm, gm)
    gm.cpu().eval()
    gm_ema = None
    if avg is not None:
        from .ir import copy_gm

        gm_ema = copy_gm(gm)
        gm_ema.load_state_dict(avg.module.state_dict())
        gm_ema.eval()
    spent = _spent(accountant, opts.delta, sigma) if dplan.steps else 0.0
    dplan.phases["finetune"] = {"steps": steps, "epsilon_after": None if math.isinf(spent) else spent}
    private = not math.isinf(opts.epsilon)
    report = {"private": private, "epsilon_target": opts.epsilon if private else None,
              "epsilon_spent": spent if private else None, "delta": opts.delta,
              "noise_multiplier": sigma, "max_grad_norm": opts.max_grad_norm, "sample_rate": q,
              "expected_batch_size": batch_size, "steps": dplan.steps, "epochs": int(epochs),
              "augmult": opts.augmult,
              "phases": {k: v for k, v in dplan.phases.items() if k in ("search", "finetune")},
              "accountant": opts.accountant, "sampling": "poisson", "phase": opts.phase,
              "n_train": n, "ema_decay": opts.ema_decay if ema else None,
              "ema_warmup": opts.ema_warmup if ema else None,
              "kd": bool(teacher is not None and kd_weight > 0), "kd_weight": kd_weight, "lr": float(lr),
              "heldout_grad_norms": norms,
              "conversion": changes, "history": history,
              "covers": covers(opts.phase)}
    if fair is not None:
        report["fairness"] = {**fair.report(), "note": "dual updates read the held-out (validation) split outside "
                              "DP-SGD: the (ε, δ) guarantee covers the training split only"}
    return DPResult(model=gm, ema=gm_ema, report=report)


def search_report(cfg: CompileConfig, dplan: DPPlan) -> dict[str, Any]:
    """The DP report when only the mask search ran under DP-SGD (``dp.phase = "search"``)."""
    spent = _spent(dplan.accountant, dplan.phases["delta"], dplan.sigma) if dplan.steps else 0.0
    eps = cfg.dp.epsilon
    private = not math.isinf(eps)
    return {"private": private, "epsilon_target": eps if private else None, "epsilon_spent": spent if private else None,
            "delta": dplan.phases["delta"], "noise_multiplier": dplan.sigma,
            "max_grad_norm": float(cfg.dp.max_grad_norm or 1.0), "sample_rate": dplan.sample_rate,
            "expected_batch_size": dplan.batch_size, "steps": dplan.steps, "epochs": int(cfg.search.epochs),
            "augmult": int(cfg.dp.augmult),
            "accountant": cfg.dp.accountant, "sampling": "poisson", "phase": "search",
            "n_train": dplan.phases.get("n_train", 0), "ema_decay": None, "kd": True,
            "conversion": list(dplan.conversion), "history": dplan.phases["search"].get("history", []),
            "phases": {k: v for k, v in dplan.phases.items() if k in ("search", "finetune")}, "covers": covers("search")}


def covers(phase: str) -> str:
    """What the (ε, δ) guarantee covers for a DP phase setting."""
    what = {"finetune": "the finetune's use of the training split; the dense model, teacher and ReLU masks are "
                        "treated as public inputs",
            "both": "the mask search's and the finetune's use of the training split (one accountant over both "
                    "phases' steps); the dense model and teacher are treated as public inputs",
            "search": "the mask search's use of the training split only (the ReLU masks); the finetune after it "
                      "is not private, so the released weights are not covered"}
    return what[phase]


def _dp_steps(loader, start, steps, steps_per_epoch, gsm, gm, opt, sched, avg, teacher, kd_weight, temperature,
              device, prog, task, history, accountant, opts, sigma, t0, save, fair=None) -> None:
    """The DP-SGD steps ``start+1 .. steps`` (history appended and ``save`` called at every epoch end)."""
    tot = correct = seen = 0.0
    for step, (x, y, g) in enumerate(loader, start + 1):
        x, y = x.to(device), y.to(device)
        w = fair.sample_weights(g) if fair is not None else None
        logits, loss = _dp_step(gsm, opt, teacher, x, y, kd_weight, temperature, w, augmult=opts.augmult)
        if fair is not None:
            fair.maybe_update(step, gm, device)
        sched.step()
        if avg is not None:
            avg.update_parameters(gm)
        tot += float(loss.detach())
        correct += int((logits.detach().argmax(1) == y).sum())
        seen += int(y.numel())
        if prog is not None:
            prog.update(task, advance=1, info=f"loss {tot / max(seen, 1):.3f} acc {100 * correct / max(seen, 1):.1f}%")
        if step % steps_per_epoch == 0 or step == steps:
            eps_now = _spent(accountant, opts.delta, sigma)
            history.append({"step": step, "loss": tot / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1),
                            "epsilon": None if math.isinf(eps_now) else eps_now,
                            "seconds": round(time.perf_counter() - t0, 2)})
            tot = correct = seen = 0.0
            if step < steps:
                save(step)


#: RDP orders: integers only.  opacus's default list adds fractional orders 1.1–10.9, whose RDP takes
#: ~50 ms each to compute (seconds per ε read-out on a loaded CPU); the bound from integer orders is
#: marginally looser (conservative), and σ is calibrated with the same orders, so spent ε ≤ target holds.
RDP_ALPHAS = [float(a) for a in (*range(2, 65), 80, 96, 128, 192, 256)]


def _eps_kwargs(kind: str) -> dict:
    return {"alphas": RDP_ALPHAS} if kind == "rdp" else {}


def _spent(accountant, delta: float, sigma: float) -> float | None:
    if sigma == 0:
        return math.inf
    if len(accountant) == 0:
        return 0.0
    return float(accountant.get_epsilon(delta, **_eps_kwargs(accountant.mechanism())))


def metadata(report: dict[str, Any], export_weights: str) -> dict[str, Any]:
    """The DP fields for the ONNX metadata."""
    eps = report.get("epsilon_spent")
    return {"dp_epsilon_spent": None if eps is None else round(eps, 4),
            "dp_epsilon_target": report.get("epsilon_target"), "dp_delta": report.get("delta"),
            "dp_noise_multiplier": round(report.get("noise_multiplier", 0.0), 5),
            "dp_max_grad_norm": report.get("max_grad_norm"), "dp_sample_rate": round(report.get("sample_rate", 0), 6),
            "dp_steps": report.get("steps"), "dp_accountant": report.get("accountant"),
            "dp_augmult": report.get("augmult", 1),
            "export_weights": export_weights}

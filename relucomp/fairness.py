"""Fairness-constrained finetuning of compressed models, on top of cooper.

Three methods (``FairConfig.method``):

``"ceag"``  Constrained Excess Accuracy Gap (Hashemizadeh et al., ICLR'24,
            "Balancing Act").  One inequality constraint per group,
            ``ψ_g = Δ_g − Δ ≤ ε``, with ``Δ_g = acc_dense(g) − acc(g)`` and
            ``Δ = acc_dense − acc``; the dense accuracies are given (train set),
            the current ones are estimated from replay buffers holding the last
            ``replay_size`` correctness indicators of every group.
            *Primal* step: the accuracy gap is not differentiable, so the
            Lagrangian uses the surrogate ``CE_g − CE`` (the group's excess
            cross-entropy on the batch) — cooper's ``ConstraintState.violation``.
            *Dual* step: projected gradient ascent (SGD, no momentum, λ ≥ 0) on
            the *true* gap ``ψ̂_g − ε`` from the replay buffers — cooper's
            ``ConstraintState.strict_violation``.
``"el"``    Equalized loss (Tran et al., "Pruning has a disparate impact on
            model accuracy"): ``CE_g − CE = 0`` per group (equality constraints,
            signed multipliers), or ``|CE_g − CE| ≤ el_tolerance`` (two
            inequalities per group) when ``el_tolerance > 0``.
``"nft"``   Plain finetuning (CE + KD), the baseline.

Multipliers are a cooper :class:`~cooper.multipliers.IndexedMultiplier`, one entry
per constraint: only the groups present in a batch are observed, so an absent
group's multiplier is neither used nor updated.  Violations for the dual step
are in *fractions* (a 5-point gap is 0.05); ``tolerance`` is in accuracy points.

The constraint machinery lives once, in :class:`FairConstraintTerm`: it can be
used inside any training loop (``total = task_loss + term.loss(logits, y, g)``;
``total.backward(); opt.step(); term.dual_step()``).  There is one fairness
training path: compile's, :class:`relucomp.fair_compile.FairPhase` wiring this
term into the search / finetune passes.

The primal Lagrangian term is differentiable with respect to the model
parameters: cooper detaches the *multiplier* in the primal Lagrangian, never the
violation, and so do we.  (A public implementation of this mitigation detached
its penalty and trained nothing.)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cooper
import torch
import torch.nn.functional as F
from cooper.multipliers import IndexedMultiplier

from relucomp.errors import DataError, FairConfigError
from relucomp.train import kd_loss  # the one KD loss

__all__ = [
    "FairConfig",
    "FairConfigError",
    "FairConstraintTerm",
    "GroupReplayBuffer",
    "group_constraint_penalty",
    "group_mean_loss",
    "kd_loss",
]

METHODS = ("ceag", "el", "nft")


# --------------------------------------------------------------------------- config


@dataclass
class FairConfig:
    """Settings of :func:`fair_finetune` / :class:`FairConstraintTerm`.

    method:           ``"ceag"`` | ``"el"`` | ``"nft"``.
    tolerance:        ε of the CEAG constraints ``ψ_g ≤ ε``, in accuracy points.
    dual_lr:          step size of the multipliers' projected gradient ascent
                      (violations in fractions: λ grows by ``dual_lr × 0.05`` per
                      step for a group 5 points over its tolerance).
    replay_size:      per-group replay buffer length (last correctness indicators)
                      for the dual estimate of the accuracy gaps.
    kd_weight:        primal loss is ``CE + kd_weight · KD`` when a teacher is given.
    kd_temperature:   KD temperature T (KL(teacher_T ‖ student_T) · T²).
    el_tolerance:     ``"el"`` only: 0 → equality ``CE_g = CE``; > 0 → ``|CE_g − CE| ≤ tol``.
    multiplier_init:  initial multiplier value (≥ 0 for inequality constraints).
    cooper_optimizer: ``"simultaneous"`` (cooper SimultaneousOptimizer) or
                      ``"alternating"`` (cooper AlternatingDualPrimalOptimizer).
    momentum, weight_decay: primal optimizer settings (momentum for SGD only).
    lr_schedule:      ``"cosine"`` (per step, over the whole run) or ``"constant"``.
    min_group_size:   groups with fewer training samples than this trigger one warning.
    log_every:        record the multipliers every this many steps.
    """

    method: str = "ceag"
    tolerance: float = 2.0
    dual_lr: float = 0.05
    replay_size: int = 40
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    el_tolerance: float = 0.0
    multiplier_init: float = 0.0
    cooper_optimizer: str = "simultaneous"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    min_group_size: int = 10
    log_every: int = 1

    def __post_init__(self) -> None:
        self.method = str(self.method).lower()
        if self.method not in METHODS:
            raise FairConfigError(f"unknown fairness method {self.method!r}", f"use one of {', '.join(METHODS)}")
        checks = [
            (self.tolerance >= 0, "tolerance must be >= 0 (accuracy points)"),
            (self.dual_lr > 0, "dual_lr must be > 0"),
            (int(self.replay_size) >= 1, "replay_size must be >= 1"),
            (self.kd_weight >= 0, "kd_weight must be >= 0"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (self.el_tolerance >= 0, "el_tolerance must be >= 0"),
            (self.method == "el" and self.el_tolerance == 0 or self.multiplier_init >= 0,
             "multiplier_init must be >= 0 for inequality constraints"),
            (self.cooper_optimizer in ("simultaneous", "alternating"),
             "cooper_optimizer must be 'simultaneous' or 'alternating'"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (int(self.log_every) >= 1, "log_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise FairConfigError(msg, "fix the FairConfig value")
        self.replay_size = int(self.replay_size)
        self.log_every = int(self.log_every)


# --------------------------------------------------------------------------- loss pieces


def group_mean_loss(
    per_sample_loss: torch.Tensor, g: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mean of a per-sample loss: returns ``(mean_g (G,), count_g (G,))``.

    Groups absent from the batch get mean 0 and count 0 (no division by zero);
    the means stay differentiable.
    """
    sums = torch.zeros(num_groups, dtype=per_sample_loss.dtype, device=per_sample_loss.device)
    sums = sums.index_add(0, g, per_sample_loss)
    counts = torch.bincount(g, minlength=num_groups)[:num_groups]
    return sums / counts.clamp(min=1).to(sums.dtype), counts


def group_constraint_penalty(
    per_sample_loss: torch.Tensor, g: torch.Tensor, multipliers: torch.Tensor
) -> torch.Tensor:
    """``Σ_g λ_g (CE_g − CE)`` over the groups present in the batch (differentiable).

    A functional form of the primal Lagrangian term of ``"ceag"``/``"el"`` for
    fixed multipliers ``λ`` (shape ``(G,)``, detached here).  Its gradient is
    ``Σ_g λ_g (∇CE_g − ∇CE)``: raising λ_g raises the weight of group g's
    samples in the parameter gradient.
    """
    G = multipliers.numel()
    ce_g, counts = group_mean_loss(per_sample_loss, g, G)
    present = (counts > 0).to(per_sample_loss.dtype)
    lam = multipliers.detach().to(per_sample_loss.dtype).reshape(-1)
    return (lam * present * (ce_g - per_sample_loss.mean())).sum()


# --------------------------------------------------------------------------- replay buffer


class GroupReplayBuffer:
    """Ring buffers of the last ``size`` correctness indicators of every group.

    Also keeps an overall ring of ``size × num_groups`` indicators (for the
    whole-set accuracy in Δ) and the cumulative number of samples seen per
    group.  All state stays on ``device``; pushes are vectorised.
    """

    def __init__(self, num_groups: int, size: int = 40, device: torch.device | str | None = None):
        self.num_groups = int(num_groups)
        self.size = int(size)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        G, R, dev = self.num_groups, self.size, self.device
        self.buf = torch.zeros(G, R, device=dev)
        self.ptr = torch.zeros(G, dtype=torch.long, device=dev)
        self.fill = torch.zeros(G, dtype=torch.long, device=dev)
        self.all_buf = torch.zeros(1, R * G, device=dev)
        self.all_ptr = torch.zeros(1, dtype=torch.long, device=dev)
        self.all_fill = torch.zeros(1, dtype=torch.long, device=dev)
        self.seen = torch.zeros(G, dtype=torch.long, device=dev)

    @staticmethod
    def _push(buf: torch.Tensor, ptr: torch.Tensor, fill: torch.Tensor, val: torch.Tensor, g: torch.Tensor) -> None:
        G, R = buf.shape
        if g.numel() == 0:
            return
        order = torch.argsort(g, stable=True)
        gs, vs = g[order], val[order]
        counts = torch.bincount(gs, minlength=G)[:G]
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(gs.numel(), device=gs.device) - starts[gs]
        skip = (counts - R).clamp(min=0)  # only the last R samples of a group survive
        keep = rank >= skip[gs]
        r = rank - skip[gs]
        pos = (ptr[gs] + r) % R
        buf[gs[keep], pos[keep]] = vs[keep]
        ptr.copy_((ptr + counts.clamp(max=R)) % R)
        fill.copy_((fill + counts).clamp(max=R))

    @torch.no_grad()
    def push(self, correct: torch.Tensor, g: torch.Tensor) -> None:
        val = correct.detach().to(self.buf.dtype).reshape(-1).to(self.device)
        g = g.reshape(-1).to(self.device)
        self._push(self.buf, self.ptr, self.fill, val, g)
        self._push(self.all_buf, self.all_ptr, self.all_fill, val, torch.zeros_like(g))
        self.seen += torch.bincount(g, minlength=self.num_groups)[: self.num_groups]

    def group_accuracy(self) -> torch.Tensor:
        """(G,) accuracy fractions over each buffer; NaN for groups never seen."""
        s = self.buf.sum(1)
        return torch.where(self.fill > 0, s / self.fill.clamp(min=1), torch.full_like(s, float("nan")))

    def overall_accuracy(self) -> torch.Tensor:
        """Scalar accuracy fraction over the overall ring; NaN before the first push."""
        f = self.all_fill[0]
        s = self.all_buf.sum()
        return torch.where(f > 0, s / f.clamp(min=1), torch.full_like(s, float("nan")))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).clone() for k in ("buf", "ptr", "fill", "all_buf", "all_ptr", "all_fill", "seen")}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            getattr(self, k).copy_(v)


# --------------------------------------------------------------------------- constraint term


def _nan_to_none(xs: Iterable[float]) -> list[float | None]:
    return [None if (x is None or not math.isfinite(x)) else float(x) for x in xs]


class FairConstraintTerm:
    """The group-fairness constraints, their multipliers and replay buffers.

    Usable in any training loop::

        term = FairConstraintTerm(G, method="ceag", dense_group_acc=..., dense_acc=...)
        logits = model(x)
        loss = F.cross_entropy(logits, y) + term.loss(logits, y, g)   # differentiable
        loss.backward(); opt.step(); opt.zero_grad()
        term.dual_step()                                            # multipliers

    ``loss`` updates the replay buffers with the batch, builds the cooper
    :class:`~cooper.ConstraintState` (surrogate ``violation`` for the primal,
    true ``strict_violation`` for the dual) and returns the primal Lagrangian
    term ``Σ_{g in batch} λ_g · violation_g`` (multipliers detached, violations
    not).  ``dual_step`` does one projected gradient-ascent step on the
    multipliers observed in the last ``loss`` call.  :func:`fair_finetune`
    drives the same term through cooper's optimizers instead.

    ``dense_group_acc`` / ``dense_acc`` (required for ``"ceag"``) are the dense
    model's train accuracies in points (0–100); a ``None``/NaN entry leaves that
    group unconstrained.  With ``method="nft"`` the term only tracks the replay
    buffers (no constraints, ``loss`` returns 0).
    """

    def __init__(
        self,
        num_groups: int,
        *,
        method: str = "ceag",
        dense_group_acc: Sequence[float | None] | None = None,
        dense_acc: float | None = None,
        tolerance: float = 2.0,
        el_tolerance: float = 0.0,
        replay_size: int = 40,
        dual_lr: float = 0.05,
        multiplier_init: float = 0.0,
        device: torch.device | str | None = None,
    ):
        cfg = FairConfig(
            method=method, tolerance=tolerance, el_tolerance=el_tolerance, replay_size=replay_size,
            dual_lr=dual_lr, multiplier_init=multiplier_init,
        )  # validates
        if int(num_groups) < 1:
            raise FairConfigError(f"num_groups must be >= 1, got {num_groups}", "pass the number of groups")
        self.num_groups = G = int(num_groups)
        self.method = cfg.method
        self.tolerance = float(tolerance)
        self.el_tolerance = float(el_tolerance)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.replay = GroupReplayBuffer(G, replay_size, self.device)
        self._state: cooper.ConstraintState | None = None
        self._warned_sizes = False

        self._constrained = torch.ones(G, dtype=torch.bool, device=self.device)
        self._dense_g = torch.full((G,), float("nan"), device=self.device)
        self._dense = float("nan")
        if self.method == "ceag":
            self._set_dense(dense_group_acc, dense_acc)

        if self.method == "nft":
            self.constraint_type = None
            self.num_constraints = 0
            self.multiplier = None
            self.constraint = None
            self.dual_optimizer = None
            return
        if self.method == "el" and self.el_tolerance == 0.0:
            self.constraint_type = cooper.ConstraintType.EQUALITY
            self.num_constraints = G
        elif self.method == "el":
            self.constraint_type = cooper.ConstraintType.INEQUALITY
            self.num_constraints = 2 * G  # g: CE_g − CE − tol ≤ 0 ; G+g: CE − CE_g − tol ≤ 0
        else:
            self.constraint_type = cooper.ConstraintType.INEQUALITY
            self.num_constraints = G
        init = torch.full((self.num_constraints,), float(multiplier_init))
        self.multiplier = IndexedMultiplier(init=init, device=self.device)
        # Our own Constraint wrapper, for use outside a cooper CMP; a CMP registers
        # a separate Constraint sharing this multiplier (cooper names constraints once).
        self.constraint = cooper.Constraint(self.constraint_type, multiplier=self.multiplier)
        # Projected gradient ascent: plain SGD, maximize=True, no momentum (cooper
        # projects λ ≥ 0 in the multiplier's post_step_).  IndexedMultiplier yields
        # sparse gradients, so unobserved groups are left untouched.
        self.dual_optimizer = torch.optim.SGD(self.multiplier.parameters(), lr=float(dual_lr), maximize=True)

    # ----------------------------------------------------------------- setup
    @classmethod
    def from_config(
        cls,
        config: FairConfig,
        num_groups: int,
        *,
        dense_group_acc: Sequence[float | None] | None = None,
        dense_acc: float | None = None,
        device: torch.device | str | None = None,
    ) -> FairConstraintTerm:
        return cls(
            num_groups, method=config.method, dense_group_acc=dense_group_acc, dense_acc=dense_acc,
            tolerance=config.tolerance, el_tolerance=config.el_tolerance, replay_size=config.replay_size,
            dual_lr=config.dual_lr, multiplier_init=config.multiplier_init, device=device,
        )

    def _set_dense(self, dense_group_acc: Sequence[float | None] | None, dense_acc: float | None) -> None:
        fix = "pass the dense model's train accuracy per group and overall, in points (0-100)"
        if dense_group_acc is None or dense_acc is None:
            raise FairConfigError("method 'ceag' needs dense_group_acc and dense_acc", fix)
        vals = [float("nan") if v is None else float(v) for v in dense_group_acc]
        if len(vals) != self.num_groups:
            raise FairConfigError(
                f"dense_group_acc has {len(vals)} entries for {self.num_groups} groups", fix
            )
        finite = [v for v in vals if math.isfinite(v)] + [float(dense_acc)]
        if any(v < 0 or v > 100 for v in finite) or not math.isfinite(float(dense_acc)):
            raise FairConfigError("dense accuracies must lie in [0, 100]", fix)
        if all(v <= 1.0 for v in finite) and any(v > 0 for v in finite):
            raise FairConfigError("dense accuracies look like fractions (all <= 1)", fix)
        self._dense_g = torch.tensor(vals, device=self.device) / 100.0
        self._dense = float(dense_acc) / 100.0
        self._constrained = torch.isfinite(self._dense_g)

    def to(self, device: torch.device | str) -> FairConstraintTerm:
        """Move buffers and multipliers (in place; the dual optimizer keeps working)."""
        device = torch.device(device)
        self.device = device
        self._constrained = self._constrained.to(device)
        self._dense_g = self._dense_g.to(device)
        rb = self.replay
        rb.device = device
        for k in ("buf", "ptr", "fill", "all_buf", "all_ptr", "all_fill", "seen"):
            setattr(rb, k, getattr(rb, k).to(device))
        if self.multiplier is not None:
            self.multiplier.to(device)  # Module.to keeps the Parameter objects
        return self

    # ----------------------------------------------------------------- core
    def _check_groups(self, g: torch.Tensor) -> None:
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= self.num_groups):
            raise DataError(
                f"group index out of range: got {int(g.min())}..{int(g.max())} for {self.num_groups} groups",
                "make group indices 0..G-1 and pass num_groups=G",
            )

    @torch.no_grad()
    def observe(self, logits: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> None:
        """Push the batch's correctness indicators into the replay buffers."""
        self._check_groups(g)
        self.replay.push(logits.detach().argmax(1) == y, g)

    @torch.no_grad()
    def observe_correct(self, correct: torch.Tensor, g: torch.Tensor) -> None:
        """Push precomputed correctness indicators (e.g. gathered from every rank of a multi-process run)."""
        self._check_groups(g)
        self.replay.push(correct, g)

    @torch.no_grad()
    def psi_estimate_frac(self) -> torch.Tensor:
        """(G,) replay estimate of ψ_g = (d_g − a_g) − (d − a), in fractions; NaN where unknown."""
        a_g = self.replay.group_accuracy()
        a = self.replay.overall_accuracy()
        return (self._dense_g - a_g) - (self._dense - a)

    def constraint_state(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        per_sample_loss: torch.Tensor | None = None,
        *,
        update_replay: bool = True,
    ) -> cooper.ConstraintState | None:
        """Build the cooper ConstraintState of this batch (None if nothing is observed).

        ``per_sample_loss`` (N,) defaults to the per-sample cross-entropy of
        ``logits``; it must be differentiable for the primal step.
        """
        if logits.device != self.device:
            self.to(logits.device)
        g = g.reshape(-1).to(logits.device)
        y = y.reshape(-1).to(logits.device)
        if update_replay:
            self.observe(logits, y, g)
        else:
            self._check_groups(g)
        if self.method == "nft" or g.numel() == 0:
            return None
        if per_sample_loss is None:
            per_sample_loss = F.cross_entropy(logits, y, reduction="none")
        G = self.num_groups
        ce_g, counts = group_mean_loss(per_sample_loss, g, G)
        # surrogate: the group's excess loss (in the multiplier's dtype: cooper's
        # einsum needs matching dtypes; the cast keeps the graph)
        excess = (ce_g - per_sample_loss.mean()).to(self.multiplier.weight.dtype)
        observed = (counts > 0) & self._constrained.to(counts.device)
        idx = observed.nonzero().flatten()
        if idx.numel() == 0:
            return None
        if self.method == "ceag":
            with torch.no_grad():
                strict = self.psi_estimate_frac()[idx] - self.tolerance / 100.0
                # a group with an empty buffer (update_replay=False) gets no dual update
                strict = torch.nan_to_num(strict, nan=0.0)
            return cooper.ConstraintState(
                violation=excess[idx], constraint_features=idx,
                strict_violation=strict.to(excess.dtype), strict_constraint_features=idx,
            )
        # "el": equalized loss
        if self.el_tolerance == 0.0:
            return cooper.ConstraintState(violation=excess[idx], constraint_features=idx)
        tol = self.el_tolerance
        viol = torch.cat([excess[idx] - tol, -excess[idx] - tol])
        return cooper.ConstraintState(violation=viol, constraint_features=torch.cat([idx, idx + G]))

    def lagrangian_term(self, state: cooper.ConstraintState | None, constraint: cooper.Constraint | None = None) -> torch.Tensor | None:
        """Primal Lagrangian contribution ``λ·violation`` of a state (λ detached by cooper)."""
        if state is None or self.constraint is None:
            return None
        c = constraint if constraint is not None else self.constraint
        store = c.compute_contribution_to_lagrangian(state, "primal")
        return None if store is None else store.lagrangian_contribution

    def loss(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        g: torch.Tensor,
        per_sample_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Update the replay buffers and return the differentiable primal Lagrangian term.

        The state is kept for the next :meth:`dual_step`.
        """
        self._state = self.constraint_state(logits, y, g, per_sample_loss)
        term = self.lagrangian_term(self._state)
        if term is None:
            return torch.zeros((), device=logits.device, dtype=logits.dtype)
        return term

    def dual_step(self, state: cooper.ConstraintState | None = None) -> None:
        """One projected gradient-ascent step on the multipliers observed in ``state``.

        ``state`` defaults to the one built by the last :meth:`loss` call.  Uses
        cooper's dual Lagrangian (``λ · strict_violation``, violation detached),
        the SGD(maximize=True) dual optimizer and the multiplier's ``post_step_``
        projection (λ ≥ 0 for inequalities).
        """
        state = state if state is not None else self._state
        self._state = None
        if state is None or self.multiplier is None:
            return
        self.dual_optimizer.zero_grad(set_to_none=True)
        store = self.constraint.compute_contribution_to_lagrangian(state, "dual")
        if store is None:
            return
        store.lagrangian_contribution.backward()
        self.dual_optimizer.step()
        self.multiplier.post_step_()

    # ----------------------------------------------------------------- reporting
    def multiplier_values(self) -> list[float]:
        """Current multipliers (one per constraint; ``[]`` for ``"nft"``)."""
        if self.multiplier is None:
            return []
        return [float(v) for v in self.multiplier.weight.detach().flatten().cpu().tolist()]

    def replay_accuracy(self) -> list[float | None]:
        """Per-group replay-buffer accuracy in points (None for unseen groups)."""
        return _nan_to_none((self.replay.group_accuracy() * 100.0).cpu().tolist())

    def replay_overall_accuracy(self) -> float | None:
        return _nan_to_none([float(self.replay.overall_accuracy()) * 100.0])[0]

    def psi_estimate(self) -> list[float | None]:
        """Replay estimate of ψ_g in points (None where unknown; all None unless ``"ceag"``)."""
        return _nan_to_none((self.psi_estimate_frac() * 100.0).cpu().tolist())

    def group_counts(self) -> list[int]:
        """Samples seen per group since creation (or the last ``reset_counts``)."""
        return [int(v) for v in self.replay.seen.cpu().tolist()]

    def reset_counts(self) -> None:
        self.replay.seen.zero_()

    def check_group_sizes(self, min_size: int = 10, names: Sequence[str] | None = None) -> list[int]:
        """Warn once about groups with fewer than ``min_size`` samples seen; return them."""
        counts = self.group_counts()
        small = [i for i, c in enumerate(counts) if c < min_size]
        if small and not self._warned_sizes:
            self._warned_sizes = True
            label = [f"{names[i] if names else i} (n={counts[i]})" for i in small]
            warnings.warn(
                "tiny or empty groups in the training data: " + ", ".join(label)
                + f" (< {min_size} samples); their constraint estimates are noisy "
                "and absent groups are never constrained",
                RuntimeWarning,
                stacklevel=2,
            )
        return small

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"replay": self.replay.state_dict()}
        if self.multiplier is not None:
            out["multiplier"] = self.multiplier.state_dict()
            out["dual_optimizer"] = self.dual_optimizer.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.replay.load_state_dict(state["replay"])
        if self.multiplier is not None and "multiplier" in state:
            self.multiplier.load_state_dict(state["multiplier"])
            self.dual_optimizer.load_state_dict(state["dual_optimizer"])

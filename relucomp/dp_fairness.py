"""CEAG under DP-SGD: multipliers from a held-out split, the primal term as bounded per-sample weights.

CEAG (:class:`relucomp.fairness.FairConstraintTerm`) cannot run inside DP-SGD as it
is: its dual update reads per-group accuracy of the *training* batches, and its
primal term ``Σ_g λ_g (L_g − L)`` is a difference of batch-level group means,
which per-sample clipping does not bound.  This module is the DP form:

* **Dual** — every ``dual_every`` steps (default: ``per_epoch`` = 4 times per DP
  epoch) the model is evaluated on a held-out split (the data set's validation
  split) and each multiplier takes one projected ascent step on that split's excess drop, ``λ_g ← max(0, λ_g + η (ψ_g − τ))``
  with ``ψ_g = (d_g − a_g) − (d − a)`` in fractions (``d``: the dense model's
  accuracy on the same split, ``τ``: the tolerance).  The held-out split is read
  outside DP-SGD: the guarantee covers the training split only, and the held-out
  split must be one the user may read freely (public, or outside the
  guarantee's scope) — the report says so.
* **Primal** — with expected group shares ``p_g`` of a batch (the held-out
  split's proportions), ``L + Σ_g λ_g (L_g − L)`` is, per sample of group ``g``,
  the loss weighted by ``w_g = 1 + λ_g / p_g − Σ_h λ_h`` (clamped at 0).  The
  weights are divided by their maximum, so every ``w ≤ 1``, and applied to each
  sample's **clipped** gradient (:func:`weight_grad_samples` clips at ``C`` and
  scales before opacus's own clipping, which then changes nothing): a sample's
  contribution stays ≤ ``C`` in norm, so the sensitivity, the noise and the
  accountant are those of plain DP-SGD.  Weighting the loss before clipping
  would do nothing here, because almost every per-sample gradient is clipped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

__all__ = ["HeldOutDuals", "weight_grad_samples"]


class HeldOutDuals:
    """CEAG multipliers updated from a held-out split (see the module docstring)."""

    def __init__(self, heldout, *, dense_group_acc: Sequence[float | None], dense_acc: float, tolerance: float,
                 dual_lr: float, num_groups: int, dual_every: int | None = None, per_epoch: int = 4):
        self.heldout = heldout
        G = int(num_groups)
        self.num_groups = G
        d = torch.tensor([float("nan") if v is None else float(v) for v in dense_group_acc], dtype=torch.float64)
        self.dense_g = d / 100.0
        self.dense = float(dense_acc) / 100.0
        self.tolerance = float(tolerance) / 100.0
        self.dual_lr = float(dual_lr)
        self.per_epoch = max(1, int(per_epoch))
        self.dual_every = None if dual_every is None else max(1, int(dual_every))
        counts = torch.bincount(heldout.groups.reshape(-1).long(), minlength=G).to(torch.float64)
        self.share = counts / counts.sum().clamp_min(1.0)
        self.constrained = torch.isfinite(self.dense_g) & (counts > 0)
        self.lam = torch.zeros(G, dtype=torch.float64)
        self.trace: list[dict[str, Any]] = []

    def set_epoch_length(self, steps_per_epoch: int) -> None:
        """Without an explicit ``dual_every``: ``per_epoch`` dual steps per epoch of ``steps_per_epoch``."""
        if self.dual_every is None:
            self.dual_every = max(1, int(steps_per_epoch) // self.per_epoch)

    # ------------------------------------------------------------------ primal
    def group_weights(self) -> torch.Tensor:
        """(G,) weights in [0, 1]: ``1 + λ_g/p_g − Σλ``, clamped at 0, divided by the largest."""
        share = torch.where(self.share > 0, self.share, torch.ones_like(self.share))
        w = (1.0 + self.lam / share - self.lam.sum()).clamp_min(0.0)
        top = float(w.max())
        return (w / top if top > 0 else torch.ones_like(w)).to(torch.float32)

    def sample_weights(self, g: torch.Tensor) -> torch.Tensor:
        return self.group_weights()[g.reshape(-1).long().cpu()]

    # -------------------------------------------------------------------- dual
    @torch.no_grad()
    def maybe_update(self, step: int, model: nn.Module, device: str = "cpu") -> bool:
        """One dual step on the held-out split every ``dual_every`` steps; True when it ran."""
        if step % self.dual_every:
            return False
        from .evaluate import predict_split

        p = predict_split(model, self.heldout, device=device)
        acc_g = torch.tensor([float("nan") if a is None else a / 100.0 for a in p.group_acc(self.num_groups)],
                             dtype=torch.float64)
        acc = p.acc / 100.0
        psi = (self.dense_g - acc_g) - (self.dense - acc)
        step_ = torch.where(self.constrained, psi - self.tolerance, torch.zeros_like(psi))
        self.lam = (self.lam + self.dual_lr * torch.nan_to_num(step_, nan=0.0)).clamp_min(0.0)
        self.trace.append({"step": int(step), "heldout_acc": 100.0 * acc,
                           "heldout_psi": [None if not torch.isfinite(v) else 100.0 * float(v) for v in psi],
                           "multipliers": [float(v) for v in self.lam],
                           "weights": [float(v) for v in self.group_weights()]})
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam.clone(), "trace": list(self.trace)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam = torch.as_tensor(state["lam"], dtype=torch.float64).clone()
        self.trace = list(state.get("trace", []))

    def report(self) -> dict[str, Any]:
        return {"method": "ceag-heldout", "dual_every": self.dual_every, "dual_lr": self.dual_lr,
                "tolerance": 100.0 * self.tolerance, "heldout_share": [float(v) for v in self.share],
                "multipliers": [float(v) for v in self.lam], "weights": [float(v) for v in self.group_weights()],
                "trace": self.trace[-200:]}


@torch.no_grad()
def weight_grad_samples(params: Sequence[nn.Parameter], weights: torch.Tensor, max_grad_norm: float) -> None:
    """Clip every sample's gradient (over all ``params``) to ``max_grad_norm`` and scale it by its weight (≤ 1).

    Works on opacus's ``p.grad_sample`` in place, before ``DPOptimizer.step``: the optimizer then measures
    norms ≤ ``max_grad_norm`` and its clipping leaves them as they are, so its noise and accounting hold.
    """
    from .dp import per_sample_grad_norms

    gs = [p.grad_sample for p in params if getattr(p, "grad_sample", None) is not None]
    norms = per_sample_grad_norms(params)
    if norms is None:
        return
    factor = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weights.to(norms.device, norms.dtype).clamp(0.0, 1.0)
    for g in gs:
        g.mul_(factor.reshape(-1, *([1] * (g.dim() - 1))).to(g.dtype))

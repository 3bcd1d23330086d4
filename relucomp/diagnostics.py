"""Per-group loss-landscape diagnostics (Tran et al.; Das et al.).

Groups whose gradient norm ``‖∇J(θ; D_g)‖`` or top Hessian eigenvalue
``λ_max(∇²J(θ; D_g))`` (largest algebraic eigenvalue, by Lanczos) is large tend to lose more accuracy under compression
(small groups, groups near the decision boundary); together they bound a
group's excess loss.  ``J(θ; D_g)`` is the mean cross-entropy over the group's
samples, evaluated *full-batch* over the data given, with the model in eval mode
(BatchNorm uses its running statistics, so per-sample losses do not depend on
the batch composition).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from relucomp.metrics import _model_device, iter_batches

__all__ = ["diagnose", "group_gradient_norms", "group_hessian_extreme_eigenvalues", "group_hessian_top_eigenvalue",
           "group_losses"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_sample_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _params(model: nn.Module) -> list[torch.nn.Parameter]:
    ps = [p for p in model.parameters() if p.requires_grad]
    if not ps:
        raise ValueError("model has no parameters requiring grad")
    return ps


class _EvalMode:
    def __init__(self, model: nn.Module):
        self.model, self.was = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.model.train(self.was)


def group_gradient_norms(
    model: nn.Module,
    data: Any,
    num_groups: int,
    max_batches: int | None = None,
    *,
    batch_size: int = 256,
    loss_fn: LossFn = _per_sample_ce,
) -> list[float]:
    """``‖∇_θ J(θ; D_g)‖₂`` for every group g (NaN for groups without samples).

    ``J(θ; D_g)`` is the mean per-sample loss (``loss_fn(logits, y)`` → (N,),
    cross-entropy by default) over all of the group's samples in ``data`` (a
    loader or dataset of ``(x, y, g)``; ``max_batches`` caps it): gradients of
    the per-group loss *sums* are accumulated batch by batch and divided by the
    group size at the end.  Eval mode, the model's mode is restored.
    """
    device = _model_device(model)
    params = _params(model)
    G = int(num_groups)
    acc = [[torch.zeros_like(p) for p in params] for _ in range(G)]
    counts = [0] * G
    with _EvalMode(model):
        for x, y, g in iter_batches(data, batch_size, max_batches):
            x, y, g = x.to(device), y.to(device), g.to(device)
            per = loss_fn(model(x), y)
            present = torch.unique(g).tolist()
            for k, gi in enumerate(present):
                if not 0 <= gi < G:
                    raise ValueError(f"group index {gi} out of range for num_groups={G}")
                mask = g == gi
                grads = torch.autograd.grad(per[mask].sum(), params, retain_graph=k < len(present) - 1,
                                            allow_unused=True)
                for a, gr in zip(acc[gi], grads):
                    if gr is not None:
                        a.add_(gr)
                counts[gi] += int(mask.sum())
    out = []
    for gi in range(G):
        if counts[gi] == 0:
            out.append(float("nan"))
            continue
        sq = sum(float((a / counts[gi]).pow(2).sum()) for a in acc[gi])
        out.append(math.sqrt(sq))
    return out


def _group_batches(data: Any, group: int, device: torch.device, batch_size: int, max_batches: int | None):
    """The group's samples, batch by batch (kept on device: reused every iteration)."""
    kept = []
    n = 0
    for x, y, g in iter_batches(data, batch_size, max_batches):
        mask = g == group
        if mask.any():
            kept.append((x[mask].to(device), y[mask].to(device)))
            n += int(mask.sum())
    return kept, n


def _hvp(model: nn.Module, params: list, batches: list, n: int, v: list[torch.Tensor], loss_fn: LossFn) -> list[torch.Tensor]:
    """Hessian-vector product of the mean group loss, by double backward."""
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = loss_fn(model(x), y).sum() / n
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        pairs = [(gr, vi) for gr, vi in zip(grads, v) if gr is not None]
        dot = sum((gr * vi).sum() for gr, vi in pairs)
        hv = torch.autograd.grad(dot, params, allow_unused=True)
        for o, h in zip(out, hv):
            if h is not None:
                o.add_(h)
    return out


def group_hessian_extreme_eigenvalues(
    model: nn.Module,
    loader: Any,
    group: int,
    *,
    tol: float = 1e-6,
    maxiter: int | None = None,
    seed: int = 0,
    max_batches: int | None = None,
    batch_size: int = 256,
    loss_fn: LossFn = _per_sample_ce,
) -> dict[str, Any]:
    """Both ends of the spectrum of ``∇²J(θ; D_group)`` by Lanczos on Hessian-vector products.

    ``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly restarted Lanczos) on a
    ``LinearOperator`` whose matvec is a Hessian-vector product (a full pass
    over the group's samples with a double backward), once with
    ``which="LA"`` (largest algebraic: λ_max) and once with ``which="SA"``
    (smallest algebraic: λ_min, negative where the loss is not locally
    convex).  Returns ``{"max", "min", "converged", "hvps"}``; ``converged``
    is False when ARPACK stopped at ``maxiter`` (the values are then its last
    Ritz estimates).  NaNs for a group without samples.  Eval mode; the
    model's mode is restored.
    """
    import numpy as np
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    device = _model_device(model)
    params = _params(model)
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    dim = int(sum(sizes))
    nan = float("nan")
    with _EvalMode(model):
        batches, n = _group_batches(loader, int(group), device, batch_size, max_batches)
        if n == 0:
            return {"max": nan, "min": nan, "converged": False, "hvps": 0}
        calls = [0]

        def matvec(vec):
            vec = np.asarray(vec, dtype=np.float64).reshape(-1)
            parts = torch.from_numpy(vec).split(sizes)
            v = [t.reshape(s).to(device=device, dtype=p.dtype) for t, s, p in zip(parts, shapes, params)]
            hv = _hvp(model, params, batches, n, v, loss_fn)
            calls[0] += 1
            return torch.cat([h.detach().reshape(-1).double().cpu() for h in hv]).numpy()

        if dim == 1:  # ARPACK needs k < dim: the 1x1 Hessian is its own eigenvalue
            val = float(matvec(np.ones(1))[0])
            return {"max": val, "min": val, "converged": True, "hvps": calls[0]}
        op = LinearOperator((dim, dim), matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(int(seed)).standard_normal(dim)
        out, converged = {}, True
        for key, which in (("max", "LA"), ("min", "SA")):
            try:
                vals = eigsh(op, k=1, which=which, tol=tol, maxiter=maxiter, v0=v0, return_eigenvectors=False)
                out[key] = float(vals[0])
            except ArpackNoConvergence as exc:
                converged = False
                vals = exc.eigenvalues
                out[key] = float(vals[0]) if len(vals) else nan
    return {**out, "converged": converged, "hvps": calls[0]}


def group_hessian_top_eigenvalue(
    model: nn.Module,
    loader: Any,
    group: int,
    iters: int | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    *,
    max_batches: int | None = None,
    batch_size: int = 256,
    loss_fn: LossFn = _per_sample_ce,
) -> float:
    """Largest *algebraic* eigenvalue of ``∇²J(θ; D_group)`` (Lanczos; see
    :func:`group_hessian_extreme_eigenvalues`).  ``iters`` caps ARPACK's
    restarts.  NaN if the group has no samples."""
    return group_hessian_extreme_eigenvalues(model, loader, group, tol=tol, maxiter=iters, seed=seed,
                                             max_batches=max_batches, batch_size=batch_size, loss_fn=loss_fn)["max"]


@torch.no_grad()
def group_losses(
    model: nn.Module, data: Any, num_groups: int, max_batches: int | None = None, *, batch_size: int = 256
) -> tuple[list[int], list[float], list[float]]:
    """(counts, mean cross-entropy, accuracy in points) per group; NaN for empty groups."""
    device = _model_device(model)
    G = int(num_groups)
    cnt = torch.zeros(G, dtype=torch.float64)
    loss = torch.zeros(G, dtype=torch.float64)
    ok = torch.zeros(G, dtype=torch.float64)
    with _EvalMode(model):
        for x, y, g in iter_batches(data, batch_size, max_batches):
            logits = model(x.to(device)).cpu()
            y, g = y.cpu(), g.cpu()
            per = F.cross_entropy(logits, y, reduction="none").double()
            cnt += torch.bincount(g, minlength=G)[:G].double()
            loss += torch.bincount(g, weights=per, minlength=G)[:G]
            ok += torch.bincount(g, weights=(logits.argmax(1) == y).double(), minlength=G)[:G]
    nan = float("nan")
    return (
        [int(c) for c in cnt.tolist()],
        [float(l_ / c) if c else nan for l_, c in zip(loss.tolist(), cnt.tolist())],
        [100.0 * float(o / c) if c else nan for o, c in zip(ok.tolist(), cnt.tolist())],
    )


def _j(v: float) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def diagnose(
    model: nn.Module,
    data: Any,
    num_groups: int,
    group_names: Sequence[str] | None = None,
    *,
    hessian: bool = True,
    hessian_iters: int | None = 20,
    hessian_tol: float = 1e-3,
    max_batches: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """JSON-serialisable per-group diagnostics.

    ``{"group_names", "counts", "loss", "acc" (points), "grad_norm",
    "hessian_top_eig", "hessian_min_eig", "hessian_converged"}``; each
    per-group field maps name → value (``None`` for empty groups, and for the
    Hessian fields when ``hessian=False``).  ``hessian_top_eig`` is the
    largest algebraic eigenvalue and ``hessian_min_eig`` the smallest (both by
    Lanczos), ``hessian_converged`` whether ARPACK converged for both.
    """
    G = int(num_groups)
    names = [str(n) for n in group_names] if group_names is not None else [str(i) for i in range(G)]
    if len(names) != G:
        raise ValueError(f"{len(names)} group names for {G} groups")
    counts, losses, accs = group_losses(model, data, G, max_batches, batch_size=batch_size)
    gn = group_gradient_norms(model, data, G, max_batches, batch_size=batch_size)
    none = {"max": float("nan"), "min": float("nan"), "converged": None}
    eig = [
        group_hessian_extreme_eigenvalues(model, data, gi, tol=hessian_tol, maxiter=hessian_iters, seed=seed,
                                          max_batches=max_batches, batch_size=batch_size)
        if hessian and counts[gi] > 0 else none
        for gi in range(G)
    ]
    return {
        "group_names": names,
        "counts": dict(zip(names, counts)),
        "loss": {n: _j(v) for n, v in zip(names, losses)},
        "acc": {n: _j(v) for n, v in zip(names, accs)},
        "grad_norm": {n: _j(v) for n, v in zip(names, gn)},
        "hessian_top_eig": {n: _j(e["max"]) for n, e in zip(names, eig)},
        "hessian_min_eig": {n: _j(e["min"]) for n, e in zip(names, eig)},
        "hessian_converged": {n: e["converged"] for n, e in zip(names, eig)},
    }

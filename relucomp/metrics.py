"""Group metrics for fair compression.

Definitions (Hashemizadeh et al., ICLR'24 "Balancing Act"; Berrada et al.):

* ``Δ_g = acc_dense(g) − acc_comp(g)``  — the accuracy a group loses,
* ``Δ   = acc_dense − acc_comp``        — the accuracy the whole set loses,
* ``ψ_g = Δ_g − Δ``                     — the group's *excess* accuracy gap,
* ``Ψ_PW = max_g ψ_g − min_g ψ_g``      — the disparity; the headline is ``max_g ψ_g``,
* worst-group error ratio ``max_g (1 − acc_g) / (1 − acc)``.

All accuracies and gaps are reported in **percentage points (0–100)**.  Empty
groups are kept in every report with count 0 and ``None`` (``NaN`` in pandas
tables) values; nothing is ever divided by zero.

Batches follow the project convention ``(x, y, g)``: images, int64 labels and
int64 group indices in ``0..G-1``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "EMA",
    "fairness_report",
    "group_accuracy",
    "iter_batches",
    "predict",
]


# --------------------------------------------------------------------------- data helpers


def _to_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def iter_batches(
    data: Any, batch_size: int = 256, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, g)`` batches from a DataLoader-like iterable or a Dataset.

    ``data`` may be anything iterable over ``(x, y, g)`` batches (a
    :class:`~torch.utils.data.DataLoader`, a list of batch tuples) or a map-style
    dataset with ``__len__``/``__getitem__`` returning ``(x, y, g)`` samples,
    which is wrapped in an unshuffled DataLoader.
    """
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) < 3:
            raise ValueError("batches must be (x, y, g) tuples: images, labels, group indices")
        x, y, g = batch[0], batch[1], batch[2]
        yield x, torch.as_tensor(y).long(), torch.as_tensor(g).long()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def predict(
    model: nn.Module, dataset_or_loader: Any, batch_size: int = 256, *, max_batches: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` in eval mode over the data; return ``(y_true, y_pred, groups)``.

    All three are int64 numpy arrays.  The model's train/eval mode is restored.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    ys, ps, gs = [], [], []
    try:
        for x, y, g in iter_batches(dataset_or_loader, batch_size, max_batches):
            logits = model(x.to(device))
            ps.append(logits.argmax(dim=1).cpu())
            ys.append(y.cpu())
            gs.append(g.cpu())
    finally:
        model.train(was_training)
    if not ys:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), empty.copy()
    return (
        torch.cat(ys).numpy().astype(np.int64),
        torch.cat(ps).numpy().astype(np.int64),
        torch.cat(gs).numpy().astype(np.int64),
    )


def _resolve_names(groups: np.ndarray, group_names: Sequence[str] | None) -> list[str]:
    if group_names is not None:
        names = [str(n) for n in group_names]
        if groups.size and (groups.min() < 0 or groups.max() >= len(names)):
            raise ValueError(
                f"group indices must lie in 0..{len(names) - 1} (len(group_names)={len(names)}); "
                f"got {int(groups.min())}..{int(groups.max())}"
            )
        return names
    n = int(groups.max()) + 1 if groups.size else 0
    return [str(i) for i in range(n)]


# --------------------------------------------------------------------------- group_accuracy


def _acc_pts(y_true: Any, y_pred: Any) -> float:
    y_true = np.asarray(y_true)
    return float(np.mean(y_true == np.asarray(y_pred)) * 100.0) if y_true.size else float("nan")


def _count(y_true: Any, y_pred: Any) -> int:  # noqa: ARG001 - MetricFrame metric signature
    return int(np.asarray(y_true).size)


def _err_pts(y_true: Any, y_pred: Any) -> float:
    return 100.0 - _acc_pts(y_true, y_pred)


def group_accuracy(
    y_true: Any,
    y_pred: Any,
    groups: Any,
    group_names: Sequence[str] | None = None,
    *,
    n_boot: int | None = 200,
    ci: float = 0.95,
    seed: int = 0,
    include_overall: bool = True,
) -> pd.DataFrame:
    """Per-group accuracy table built with fairlearn's :class:`MetricFrame`.

    Columns: ``count``, ``accuracy`` and ``error`` (percentage points) and, when
    ``n_boot`` is a positive int, ``acc_ci_low``/``acc_ci_high``: the bootstrap
    confidence interval (level ``ci``) from MetricFrame's own bootstrap
    (``n_boot``/``ci_quantiles``/``random_state``; it resamples the whole set, so
    a group missing from a resample is skipped for that resample).  Rows are
    indexed by group name, in group-index order; groups with no samples are kept
    with count 0 and NaN values.  With ``include_overall`` a last row named
    ``"overall"`` holds the whole-set figures.
    """
    from fairlearn.metrics import MetricFrame

    yt, yp, gr = _to_numpy(y_true).reshape(-1), _to_numpy(y_pred).reshape(-1), _to_numpy(groups).reshape(-1)
    if not (yt.shape == yp.shape == gr.shape):
        raise ValueError(f"y_true, y_pred, groups must have equal length; got {yt.shape}, {yp.shape}, {gr.shape}")
    names = _resolve_names(gr.astype(np.int64), group_names)
    gr = gr.astype(np.int64)
    columns = ["count", "accuracy", "error"]
    do_ci = bool(n_boot) and n_boot > 0
    if do_ci:
        columns += ["acc_ci_low", "acc_ci_high"]
    table = pd.DataFrame(np.nan, index=pd.Index(names, name="group"), columns=columns)
    table["count"] = 0

    if yt.size:
        sens = pd.Series(gr, name="group")
        mf = MetricFrame(
            metrics={"count": _count, "accuracy": _acc_pts, "error": _err_pts},
            y_true=yt,
            y_pred=yp,
            sensitive_features=sens,
        )
        by = mf.by_group
        for gi, row in by.iterrows():
            name = names[int(gi)]
            table.loc[name, "count"] = int(row["count"])
            table.loc[name, "accuracy"] = float(row["accuracy"])
            table.loc[name, "error"] = float(row["error"])
        if do_ci:
            alpha = (1.0 - ci) / 2.0
            mf_ci = MetricFrame(
                metrics={"accuracy": _acc_pts},
                y_true=yt,
                y_pred=yp,
                sensitive_features=sens,
                n_boot=int(n_boot),
                ci_quantiles=[alpha, 1.0 - alpha],
                random_state=int(seed),
            )
            lo, hi = mf_ci.by_group_ci
            for gi in lo.index:
                name = names[int(gi)]
                table.loc[name, "acc_ci_low"] = float(lo.loc[gi, "accuracy"])
                table.loc[name, "acc_ci_high"] = float(hi.loc[gi, "accuracy"])
            olo, ohi = mf_ci.overall_ci
            overall_ci = (float(olo["accuracy"]), float(ohi["accuracy"]))
    if include_overall:
        row = {"count": int(yt.size), "accuracy": _acc_pts(yt, yp), "error": _err_pts(yt, yp)}
        if do_ci:
            row["acc_ci_low"], row["acc_ci_high"] = overall_ci if yt.size else (np.nan, np.nan)
        table.loc["overall"] = pd.Series(row)
    table["count"] = table["count"].astype(np.int64)
    return table


# --------------------------------------------------------------------------- fairness_report


def _none_if_nan(v: float | None) -> float | None:
    if v is None:
        return None
    v = float(v)
    return None if (math.isnan(v) or math.isinf(v)) else v


def _disparity_stats(
    cnt: np.ndarray, ok_d: np.ndarray, ok_c: np.ndarray
) -> dict[str, np.ndarray]:
    """Vectorised metric definitions.

    ``cnt`` (..., G) group counts, ``ok_d``/``ok_c`` (..., G) numbers of correct
    predictions of the dense and compiled model.  Returns arrays over the
    leading dims; NaN marks undefined values (empty groups, zero overall error).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        n = cnt.sum(-1)
        nonempty = cnt > 0
        acc_d_g = np.where(nonempty, 100.0 * ok_d / np.maximum(cnt, 1), np.nan)
        acc_c_g = np.where(nonempty, 100.0 * ok_c / np.maximum(cnt, 1), np.nan)
        acc_d = np.where(n > 0, 100.0 * ok_d.sum(-1) / np.maximum(n, 1), np.nan)
        acc_c = np.where(n > 0, 100.0 * ok_c.sum(-1) / np.maximum(n, 1), np.nan)
        delta_g = acc_d_g - acc_c_g
        delta = acc_d - acc_c
        psi = delta_g - delta[..., None]
        any_group = nonempty.any(-1)
        psi_max = np.where(any_group, np.max(np.where(nonempty, psi, -np.inf), axis=-1), np.nan)
        psi_min = np.where(any_group, np.min(np.where(nonempty, psi, np.inf), axis=-1), np.nan)

        def err_ratio(acc_g: np.ndarray, acc: np.ndarray) -> np.ndarray:
            err = 100.0 - acc
            ratio_g = (100.0 - acc_g) / err[..., None]
            defined = nonempty & (err[..., None] > 0)
            ratio_g = np.where(defined, ratio_g, np.nan)
            worst = np.max(np.where(defined, ratio_g, -np.inf), axis=-1)
            return ratio_g, np.where(np.isfinite(worst), worst, np.nan)

        ratio_d_g, worst_d = err_ratio(acc_d_g, acc_d)
        ratio_c_g, worst_c = err_ratio(acc_c_g, acc_c)
    return {
        "acc_dense_g": acc_d_g,
        "acc_comp_g": acc_c_g,
        "acc_dense": acc_d,
        "acc_comp": acc_c,
        "delta_g": delta_g,
        "delta": delta,
        "psi_g": psi,
        "max_psi": psi_max,
        "min_psi": psi_min,
        "psi_pw": psi_max - psi_min,
        "err_ratio_dense_g": ratio_d_g,
        "err_ratio_comp_g": ratio_c_g,
        "worst_err_ratio_dense": worst_d,
        "worst_err_ratio_comp": worst_c,
    }


def _stratified_bootstrap(
    groups: np.ndarray, ok_d: np.ndarray, ok_c: np.ndarray, num_groups: int, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample within each group (group sizes fixed); return (B,G) count/correct arrays."""
    rng = np.random.default_rng(seed)
    cnt = np.bincount(groups, minlength=num_groups).astype(np.float64)
    sd = np.zeros((n_boot, num_groups))
    sc = np.zeros((n_boot, num_groups))
    for g in range(num_groups):
        idx = np.flatnonzero(groups == g)
        n = idx.size
        if n == 0:
            continue
        d, c = ok_d[idx].astype(np.float64), ok_c[idx].astype(np.float64)
        # chunk so that B x n index matrices stay small
        chunk = max(1, int(2_000_000 // n))
        for b0 in range(0, n_boot, chunk):
            b1 = min(n_boot, b0 + chunk)
            r = rng.integers(0, n, size=(b1 - b0, n))
            sd[b0:b1, g] = d[r].sum(1)
            sc[b0:b1, g] = c[r].sum(1)
    return np.broadcast_to(cnt, (n_boot, num_groups)), sd, sc


def fairness_report(
    y_true: Any,
    pred_dense: Any,
    pred_compiled: Any,
    groups: Any,
    group_names: Sequence[str] | None = None,
    *,
    n_boot: int = 200,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare a dense and a compiled model's predictions group by group.

    Returns a JSON-serialisable dict (accuracies and gaps in percentage points)::

        {
          "units": "percentage points",
          "num_samples": N, "group_names": [...],
          "overall": {"acc_dense", "acc_compiled", "delta"},
          "groups": {name: {"count", "acc_dense", "acc_compiled", "delta", "psi",
                            "error_ratio_dense", "error_ratio_compiled"}},
          "psi_pw": Ψ_PW, "max_psi": max_g ψ_g, "min_psi": ..., "argmax_psi": name,
          "worst_group_error_ratio": {"dense": ..., "compiled": ...},
          "ci": {"level", "n_boot", "method", "overall": {...: [lo, hi]},
                 "groups": {name: {...: [lo, hi]}}, "psi_pw": [lo, hi], "max_psi": [lo, hi],
                 "worst_group_error_ratio": {"dense": [lo, hi], "compiled": [lo, hi]}},
        }

    Empty groups have count 0 and ``None`` everywhere and are left out of the
    max/min over groups.  Per-group counts and accuracies come from
    :func:`group_accuracy` (fairlearn's ``MetricFrame``).  ``error_ratio`` is ``(1 − acc_g)/(1 − acc)``; it is
    ``None`` when the overall error is 0 (ratio undefined).  CIs come from a
    *paired, stratified* bootstrap (each group resampled within itself, the
    dense and compiled predictions of a sample kept together), seeded by
    ``seed``; ``n_boot=0`` disables them (``"ci": None``).
    """
    yt = _to_numpy(y_true).reshape(-1).astype(np.int64)
    pd_ = _to_numpy(pred_dense).reshape(-1).astype(np.int64)
    pc = _to_numpy(pred_compiled).reshape(-1).astype(np.int64)
    gr = _to_numpy(groups).reshape(-1).astype(np.int64)
    if not (yt.shape == pd_.shape == pc.shape == gr.shape):
        raise ValueError(
            f"y_true, pred_dense, pred_compiled, groups must have equal length; "
            f"got {yt.shape}, {pd_.shape}, {pc.shape}, {gr.shape}"
        )
    names = _resolve_names(gr, group_names)
    G = len(names)
    if G == 0:
        raise ValueError("fairness_report needs samples or group_names (got neither)")
    ok_d = (pd_ == yt).astype(np.float64)
    ok_c = (pc == yt).astype(np.float64)
    # point estimates: per-group counts and accuracies from fairlearn's MetricFrame
    tab_d = group_accuracy(yt, pd_, gr, names, n_boot=None, include_overall=False)
    tab_c = group_accuracy(yt, pc, gr, names, n_boot=None, include_overall=False)
    cnt = tab_d["count"].to_numpy(dtype=np.float64)
    sd = np.rint(np.nan_to_num(tab_d["accuracy"].to_numpy(dtype=np.float64)) * cnt / 100.0)
    sc = np.rint(np.nan_to_num(tab_c["accuracy"].to_numpy(dtype=np.float64)) * cnt / 100.0)
    st = _disparity_stats(cnt, sd, sc)

    group_rows: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        group_rows[name] = {
            "count": int(cnt[i]),
            "acc_dense": _none_if_nan(st["acc_dense_g"][i]),
            "acc_compiled": _none_if_nan(st["acc_comp_g"][i]),
            "delta": _none_if_nan(st["delta_g"][i]),
            "psi": _none_if_nan(st["psi_g"][i]),
            "error_ratio_dense": _none_if_nan(st["err_ratio_dense_g"][i]),
            "error_ratio_compiled": _none_if_nan(st["err_ratio_comp_g"][i]),
        }
    nonempty = [i for i in range(G) if cnt[i] > 0]
    argmax = names[max(nonempty, key=lambda i: st["psi_g"][i])] if nonempty else None
    report: dict[str, Any] = {
        "units": "percentage points",
        "source": "fairlearn.MetricFrame (per-group counts and accuracies); paired stratified bootstrap for CIs",
        "num_samples": int(yt.size),
        "group_names": list(names),
        "overall": {
            "acc_dense": _none_if_nan(st["acc_dense"]),
            "acc_compiled": _none_if_nan(st["acc_comp"]),
            "delta": _none_if_nan(st["delta"]),
        },
        "groups": group_rows,
        "psi_pw": _none_if_nan(st["psi_pw"]),
        "max_psi": _none_if_nan(st["max_psi"]),
        "min_psi": _none_if_nan(st["min_psi"]),
        "argmax_psi": argmax,
        "worst_group_error_ratio": {
            "dense": _none_if_nan(st["worst_err_ratio_dense"]),
            "compiled": _none_if_nan(st["worst_err_ratio_comp"]),
        },
        "ci": None,
    }
    if n_boot and n_boot > 0 and yt.size:
        bc, bd, bcmp = _stratified_bootstrap(gr, ok_d, ok_c, G, int(n_boot), seed)
        bs = _disparity_stats(bc, bd, bcmp)
        alpha = (1.0 - ci) / 2.0

        def q(a: np.ndarray) -> list[float | None] | None:
            a = np.asarray(a, dtype=np.float64)
            a = a[np.isfinite(a)]
            if a.size == 0:
                return None
            lo, hi = np.quantile(a, [alpha, 1.0 - alpha])
            return [float(lo), float(hi)]

        report["ci"] = {
            "level": ci,
            "n_boot": int(n_boot),
            "method": "paired stratified bootstrap (percentile)",
            "seed": int(seed),
            "overall": {
                "acc_dense": q(bs["acc_dense"]),
                "acc_compiled": q(bs["acc_comp"]),
                "delta": q(bs["delta"]),
            },
            "groups": {
                name: {
                    "acc_dense": q(bs["acc_dense_g"][:, i]),
                    "acc_compiled": q(bs["acc_comp_g"][:, i]),
                    "delta": q(bs["delta_g"][:, i]),
                    "psi": q(bs["psi_g"][:, i]),
                }
                for i, name in enumerate(names)
            },
            "psi_pw": q(bs["psi_pw"]),
            "max_psi": q(bs["max_psi"]),
            "worst_group_error_ratio": {
                "dense": q(bs["worst_err_ratio_dense"]),
                "compiled": q(bs["worst_err_ratio_comp"]),
            },
        }
    return report


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights (parameters *and* buffers).

    ``shadow ← decay · shadow + (1 − decay) · current`` at every :meth:`update`.
    Floating-point tensors are averaged; integer buffers (e.g. BatchNorm's
    ``num_batches_tracked``) are copied.  The averaged weights live in
    :attr:`module`, a deep copy of the model in eval mode with gradients off;
    evaluate it with :meth:`averaged_model` or write the averages into a model
    with :meth:`copy_to` (Berrada et al.: report disparities for averaged weights
    as well as for the last iterate).

    With ``warmup=True`` the effective decay is ``min(decay, (1+n)/(10+n))``
    after ``n`` updates, so early averages are not dominated by the start point.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, *, warmup: bool = False):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model)
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        mine = self.module.state_dict(keep_vars=True)
        theirs = model.state_dict(keep_vars=True)
        if mine.keys() != theirs.keys():
            missing = sorted(set(mine) ^ set(theirs))[:5]
            raise ValueError(f"EMA: model structure changed since the EMA was created (keys differ: {missing})")
        for k, v in mine.items():
            yield v, theirs[k]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        d = self.decay
        if self.warmup:
            d = min(d, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        for shadow, cur in self._pairs(model):
            cur = cur.detach()
            if shadow.dtype.is_floating_point or shadow.dtype.is_complex:
                shadow.mul_(d).add_(cur.to(shadow.device, shadow.dtype), alpha=1.0 - d)
            else:
                shadow.copy_(cur)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s parameters and buffers with the averages."""
        for shadow, cur in self._pairs(model):
            cur.copy_(shadow.to(cur.device, cur.dtype))

    def averaged_model(self) -> nn.Module:
        """The model holding the averaged weights (eval mode, shared, not a copy)."""
        return self.module

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])

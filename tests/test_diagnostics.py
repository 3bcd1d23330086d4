import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from relucomp.diagnostics import (diagnose, group_gradient_norms, group_hessian_extreme_eigenvalues,
                                  group_hessian_top_eigenvalue)


def data(n=60, seed=0, groups=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    g = torch.randint(0, groups, (n,), generator=gen)
    return torch.utils.data.TensorDataset(x, y, g)


def logistic(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double()


def _group_loss_fn(model, ds, group):
    x, y, g = ds.tensors
    m = g == group
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def f(flat):
        parts = torch.split(flat, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return F.cross_entropy(functional_call(model, params, (x[m],)), y[m])

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    return f, flat


def test_power_iteration_matches_exact_hessian():
    ds = data()
    model = logistic()
    loader = torch.utils.data.DataLoader(ds, batch_size=16)  # several batches: tests accumulation
    for group in (0, 2):
        f, flat = _group_loss_fn(model, ds, group)
        H = torch.autograd.functional.hessian(f, flat)
        exact = torch.linalg.eigvalsh(H).max().item()
        est = group_hessian_top_eigenvalue(model, loader, group, iters=200, tol=1e-9, seed=0)
        assert est == pytest.approx(exact, rel=1e-2)


def tanh_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Tanh(), nn.Linear(3, 3)).double()


def test_lanczos_matches_eigvalsh_on_indefinite_hessian():
    """Both ends of an indefinite Hessian to 1e-4, where power iteration would return the
    largest-*magnitude* eigenvalue (here the negative one) as 'the top'."""
    ds = data()
    model = tanh_net(seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=16)
    f, flat = _group_loss_fn(model, ds, 0)
    ev = torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat))
    lo, hi = ev.min().item(), ev.max().item()
    assert lo < 0 < hi  # indefinite: the test is meaningful
    res = group_hessian_extreme_eigenvalues(model, loader, 0, tol=1e-10, seed=0)
    assert res["converged"] is True and res["hvps"] > 0
    assert res["max"] == pytest.approx(hi, abs=1e-4)
    assert res["min"] == pytest.approx(lo, abs=1e-4)
    assert group_hessian_top_eigenvalue(model, loader, 0, tol=1e-10) == pytest.approx(hi, abs=1e-4)


def test_lanczos_reports_non_convergence():
    ds = data()
    res = group_hessian_extreme_eigenvalues(tanh_net(seed=3), ds, 0, tol=1e-14, maxiter=1, batch_size=64)
    assert res["converged"] is False


def test_hessian_empty_group_is_nan():
    ds = data(groups=2)
    assert math.isnan(group_hessian_top_eigenvalue(logistic(), ds, 2, iters=3))


def test_group_gradient_norms_match_full_batch():
    ds = data()
    model = logistic()
    loader = torch.utils.data.DataLoader(ds, batch_size=7)
    norms = group_gradient_norms(model, loader, num_groups=4)  # group 3 is empty
    for group in range(3):
        f, flat = _group_loss_fn(model, ds, group)
        (gr,) = torch.autograd.grad(f(flat.requires_grad_(True)), flat)
        assert norms[group] == pytest.approx(gr.norm().item(), rel=1e-6)
    assert math.isnan(norms[3])
    assert all(p.grad is None for p in model.parameters())  # no .grad side effects


def test_eval_mode_bn_and_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3))
    model.train()
    ds = torch.utils.data.TensorDataset(torch.randn(20, 3, 2, 2), torch.randint(0, 3, (20,)),
                                        torch.randint(0, 2, (20,)))
    rm = model[1].running_mean.clone()
    # eval-mode BN: per-sample losses do not depend on batching -> same norm for any batch size
    a = group_gradient_norms(model, torch.utils.data.DataLoader(ds, batch_size=3), 2)
    b = group_gradient_norms(model, torch.utils.data.DataLoader(ds, batch_size=20), 2)
    assert a == pytest.approx(b, rel=1e-5)
    assert model.training and torch.equal(model[1].running_mean, rm)
    d = diagnose(model, ds, 3, ["x", "y", "z"], hessian_iters=5)
    assert model.training
    assert d["counts"]["z"] == 0 and d["grad_norm"]["z"] is None and d["hessian_top_eig"]["z"] is None
    assert d["grad_norm"]["x"] == pytest.approx(a[0], rel=1e-5)
    assert d["hessian_top_eig"]["x"] is not None and d["loss"]["y"] > 0
    assert d["hessian_min_eig"]["x"] <= d["hessian_top_eig"]["x"] and isinstance(d["hessian_converged"]["x"], bool)
    json.dumps(d, allow_nan=False)

"""Every nonlinearity seen: ReLU equivalents canonicalized (and gated), other comparison-bearing
ops counted, ReLUs hidden in leaf modules counted, and budgets they would break refused before training."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import relucomp.api as api
from relucomp.budget import check_relu_budget, check_uncounted_nonlinearities
from relucomp.errors import BudgetError
from relucomp.infra import PassManager
from relucomp.ir import meta, relu_nodes, trace
from relucomp.passes.canonicalize import CanonicalizeReLUPass
from relucomp.passes.dce import DeadCodeEliminationPass
from relucomp.passes.shape_prop import ShapeAnalysisPass, layer_table, ungated_comparisons
from relucomp.verify import onnx_relu_count


class Equivalents(nn.Module):
    """Nine exact ReLU equivalents (and a read of an in-place clamp's input afterwards)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.th = nn.Threshold(0, 0)
        self.ht = nn.Hardtanh(0.0, math.inf)
        self.leaky0 = nn.LeakyReLU(0.0)

    def forward(self, x):
        x = self.conv(x)
        a = torch.clamp(x - 0.1, min=0)
        b = (x + 0.1).clamp(min=0.0)
        c = torch.clamp_min(x - 0.2, 0)
        d = F.threshold(x + 0.2, 0.0, 0.0)
        e = self.th(x - 0.3)
        f = self.ht(x + 0.3) + F.hardtanh(x - 0.4, 0.0, float("inf"))
        g = self.leaky0(x + 0.4)
        t = x * 1.5
        t.clamp_(min=0)                                  # in-place, result discarded, t read later
        return torch.cat([a, b, c, d, e, f, g, t, x.clip(min=0)], 1)


def _analyze(model, x):
    gm = trace(model)
    return PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass(), ShapeAnalysisPass(x[:1])],
                       calibration=x).run(gm).gm


def test_relu_equivalents_become_gateable_relus():
    model = Equivalents().eval()
    x = torch.randn(4, 3, 8, 8)
    gm = _analyze(model, x)  # PassManager checks numerical equivalence with the traced model
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x))
    assert len(relu_nodes(gm)) == 10 and all(n.target is torch.relu for n in relu_nodes(gm))
    assert ungated_comparisons(gm)["total"] == 0
    assert sum(r["relus"] for r in layer_table(gm)) == 10 * 4 * 8 * 8


class NotEquivalent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.r6 = nn.ReLU6()
        self.leaky = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        x = torch.relu(self.conv(x))                     # 256 gateable ReLUs
        a = self.r6(x)                                   # 2 per element
        b = F.relu6(x)                                   # 2
        c = torch.clamp(x, min=0.5)                      # 1 (a shifted ReLU is not a ReLU)
        d = torch.clamp(x, -1.0, 1.0)                    # 2
        e = self.leaky(x) + F.gelu(x) + torch.sigmoid(x)  # 1 + 1 + 1
        f = torch.maximum(x, torch.zeros_like(x))        # 1
        p = self.pool(a + b + c + d + e + f)             # 4x4x4 outputs x 3 comparisons
        return p.flatten(1).amax(1, keepdim=True)        # 64 - 1


def test_other_comparisons_are_counted_per_op():
    gm = _analyze(NotEquivalent().eval(), torch.randn(2, 3, 8, 8))
    assert len(relu_nodes(gm)) == 1
    n = 4 * 8 * 8
    ops = {}
    for r in layer_table(gm):
        for k, v in r.get("nonlinearities", {}).items():
            ops[k] = ops.get(k, 0) + v
    assert ops == {"relu6": 4 * n, "clamp": 3 * n, "leaky_relu": n, "gelu": n, "sigmoid": n, "maximum": n,
                   "maxpool": 64 * 3, "amax": 63}
    un = ungated_comparisons(gm)
    assert un["total"] == 11 * n + 63
    assert ungated_comparisons(gm, include_maxpool=True)["total"] == 11 * n + 63 + 192
    info = api.inspect(NotEquivalent(), image_size=8, num_classes=1)
    assert info["total"]["relus"] == n and info["total"]["comparisons"] == 11 * n + 63
    assert info["total"]["maxpool_comparisons"] == 192
    assert {r["kind"] for r in info["layers"]} >= {"relu", "nonlinear", "maxpool"}


class Block(nn.Module):
    """An opaque block: ReLUs as a module, a function and a clamp."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.act(self.conv(x))
        return F.relu(y - 0.1) + torch.clamp(x, min=0)


class HiddenReLUs(nn.Module):
    """8x8x8 = 512 ReLUs per op: stem clamp(min=0) (gateable once canonicalized), 3x512 hidden in the leaf."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, stride=4)
        self.block = Block(8)
        self.head = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        x = torch.clamp(self.stem(x), min=0)
        return self.head(self.block(x).flatten(1))


def test_relus_hidden_in_a_leaf_module_are_counted():
    gm = api.analyze(HiddenReLUs().eval(), torch.randn(2, 3, 32, 32), leaf_modules=[Block])
    rows = {r["name"]: r for r in layer_table(gm)}
    assert rows["block"]["kind"] == "leaf" and rows["block"]["hidden_relus"] == 3 * 512
    assert len(relu_nodes(gm)) == 1 and meta(relu_nodes(gm)[0])["relus"] == 512
    total = sum(r["relus"] for r in rows.values())
    assert total == 4 * 512  # the "budget above the model's ReLUs" check sees all of them
    with pytest.raises(BudgetError, match="3,000 is above the model's 2,048 ReLUs"):
        check_relu_budget(3000, total)
    assert check_uncounted_nonlinearities(gm, 2000) == 2000 - 3 * 512
    with pytest.raises(BudgetError) as err:
        check_uncounted_nonlinearities(gm, 1000)
    assert "1,536" in err.value.cause and "block" in err.value.cause and "un-leaf" in err.value.fix


def test_maxpool_in_budget_option():
    gm = _analyze(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval(),
                  torch.randn(2, 3, 8, 8))
    assert check_uncounted_nonlinearities(gm, 100) == 100
    assert check_uncounted_nonlinearities(gm, 200, include_maxpool=True) == 200 - 64 * 3
    with pytest.raises(BudgetError, match="maxpool") as err:
        check_uncounted_nonlinearities(gm, 150, include_maxpool=True)
    assert "--budget-includes-maxpool" in err.value.fix


def test_compile_refuses_hidden_relus_over_budget_before_training(rc_cache, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("training started")

    import relucomp.stages.pretrain as pretrain_stage
    import relucomp.stages.search as search_stage

    monkeypatch.setattr(pretrain_stage, "pretrain", boom)
    monkeypatch.setattr(search_stage, "SNLSearchPass", boom)
    with pytest.raises(BudgetError) as err:
        api.compile(HiddenReLUs(), "synthetic", relu_budget=1500, leaf_modules=[Block], limit=200, progress=False)
    assert "block" in err.value.cause and "cannot gate" in err.value.cause


@pytest.mark.e2e
def test_compile_gates_clamp_and_counts_hidden_relus(rc_cache, tmp_path):
    """ReLUs in a leaf module (one of them a clamp(min=0), exported as a ReLU-equivalent Max/Clip) and a
    clamp(min=0) outside it: the outer one is gated, the hidden ones are charged to the budget, and the
    exported graph's ReLU count equals the report's."""
    res = api.compile(HiddenReLUs(), "synthetic", relu_budget=1800, leaf_modules=[Block], limit=200,
                      search_epochs=1, finetune_epochs=0, progress=False, out_dir=tmp_path / "out")
    rep = res.report
    assert rep["relus"]["before"] == 2048 and rep["relus"]["gate_budget"] == 1800 - 1536
    assert rep["relus"]["hidden_after"] == 1536
    assert rep["per_layer"][0]["relus_before"] == 512  # the clamp(min=0) is a gated site
    assert 1536 < rep["relus"]["after"] <= 1800
    counted = onnx_relu_count(onnx.load(str(res.onnx_path)))
    assert counted["relus"] == rep["relus"]["after"]  # the graph's count equals the report's
    # ungated comparisons include the hidden ReLUs: gated kept + ungated = what the graph evaluates
    gated_kept = rep["relus"]["after"] - rep["relus"]["hidden_after"]
    assert counted["budgeted_comparisons"] == gated_kept + rep["comparisons"]["ungated_after"] <= 1800
    assert rep["export"]["onnx_relus"] == rep["relus"]["after"]

"""relucomp.infra (Pass, AnalysisPass, PassManager) and relucomp.verify helpers."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from relucomp.errors import ModelLoadError, PassError
from relucomp.infra import AnalysisPass, Pass, PassManager, PassRecord, PassResult
from relucomp.ir import trace
from relucomp.verify import allclose, lint, run_eval


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


@pytest.fixture
def gm_x():
    torch.manual_seed(0)
    return trace(Small()), torch.randn(3, 3, 8, 8)


class ScaleConvWeightPass(Pass):
    """A deliberately wrong 'semantics-preserving' pass: doubles the conv weight."""

    def call(self, gm):
        with torch.no_grad():
            gm.conv.weight.mul_(2.0)
        return PassResult(gm, True, {"scaled": 1})


class DishonestScalePass(ScaleConvWeightPass):
    """Same bug, but it also claims it did not modify anything."""

    def call(self, gm):
        super().call(gm)
        return PassResult(gm, False)


class NoOpPass(Pass):
    def call(self, gm):
        return PassResult(gm, False, {"noop": True})


class SleepPass(Pass):
    def call(self, gm):
        time.sleep(0.02)
        return PassResult(gm, False)


class CountNodes(AnalysisPass):
    def analyze(self, gm):
        return {"nodes": len(gm.graph.nodes)}


class DanglingModulePass(Pass):
    """Calls a submodule that does not exist but says it changed nothing (skips Pass.__call__'s lint)."""

    def call(self, gm):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        gm.add_submodule("does_not_exist", nn.Identity())
        with gm.graph.inserting_before(out):
            new = gm.graph.call_module("does_not_exist", (out.args[0],))
        out.replace_input_with(out.args[0], new)
        delattr(gm, "does_not_exist")  # the node now calls a module that is gone
        return PassResult(gm, False)


class RaisingPass(Pass):
    def call(self, gm):
        raise KeyError("boom")


class UserErrorPass(Pass):
    def call(self, gm):
        raise ModelLoadError("bad user input", "fix it")


class WrongReturnPass(Pass):
    def call(self, gm):
        return gm


class TrainingLikePass(ScaleConvWeightPass):
    preserves_semantics = False


def test_detects_wrong_semantics_preserving_pass(gm_x):
    gm, x = gm_x
    pm = PassManager([NoOpPass(), ScaleConvWeightPass(), NoOpPass()], calibration=x)
    with pytest.raises(PassError) as ei:
        pm.run(gm)
    assert ei.value.pass_name == "ScaleConvWeightPass"
    assert "ScaleConvWeightPass" in str(ei.value) and "output changed" in str(ei.value)
    assert [r.name for r in pm.records] == ["NoOpPass"]  # stops at the failing pass


def test_detects_wrong_pass_that_claims_no_change(gm_x):
    gm, x = gm_x
    with pytest.raises(PassError, match="DishonestScalePass"):
        PassManager([DishonestScalePass()], calibration=x).run(gm)


def test_wrong_pass_passes_without_calibration_or_when_not_semantics_preserving(gm_x):
    gm, x = gm_x
    w0 = gm.conv.weight.detach().clone()
    PassManager([ScaleConvWeightPass()]).run(gm)  # lint only
    PassManager([ScaleConvWeightPass()], calibration=x, check=False).run(gm)
    res = PassManager([TrainingLikePass()], calibration=x).run(gm)
    assert res.modified is True
    assert torch.equal(gm.conv.weight.detach(), w0 * 8)  # all three ran


def test_lint_runs_after_each_pass(gm_x):
    gm, x = gm_x
    pm = PassManager([NoOpPass(), DanglingModulePass(), NoOpPass()])
    with pytest.raises(PassError) as ei:
        pm.run(gm)
    assert ei.value.pass_name == "DanglingModulePass"
    assert "lint" in str(ei.value) and "does_not_exist" in str(ei.value)
    assert len(pm.records) == 1


def test_exceptions_are_wrapped_with_pass_name_but_user_errors_pass_through(gm_x):
    gm, x = gm_x
    with pytest.raises(PassError, match=r"'RaisingPass' failed: KeyError") as ei:
        PassManager([RaisingPass()]).run(gm)
    assert isinstance(ei.value.__cause__, KeyError)
    with pytest.raises(ModelLoadError, match="bad user input"):
        PassManager([UserErrorPass()]).run(gm)
    with pytest.raises(PassError, match="expected PassResult"):
        PassManager([WrongReturnPass()]).run(gm)


def test_records_timings_stats_and_callback(gm_x):
    gm, x = gm_x
    seen: list[PassRecord] = []
    pm = PassManager([SleepPass(), CountNodes(), TrainingLikePass()], calibration=x, on_pass=seen.append)
    res = pm.run(gm)
    assert [r.name for r in pm.records] == ["SleepPass", "CountNodes", "TrainingLikePass"]
    assert seen == pm.records
    assert pm.records[0].seconds >= 0.02
    assert all(r.seconds >= 0 for r in pm.records)
    assert pm.records[1].stats == {"nodes": len(gm.graph.nodes)}
    assert pm.records[1].max_abs_diff == 0.0  # checked, unchanged
    assert pm.records[2].max_abs_diff is None  # not semantics-preserving: not compared
    d = pm.records[0].to_dict()
    assert set(d) == {"pass", "modified", "seconds", "max_abs_diff", "stats"}
    assert res.modified is True
    assert [p["pass"] for p in res.stats["passes"]] == ["SleepPass", "CountNodes", "TrainingLikePass"]


def test_analysis_pass_returns_modified_false(gm_x):
    gm, x = gm_x
    before = str(gm.graph)
    r = CountNodes()(gm)
    assert r.modified is False and r.gm is gm and r.stats["nodes"] == len(gm.graph.nodes)
    res = PassManager([CountNodes(), NoOpPass()], calibration=x).run(gm)
    assert res.modified is False
    assert str(gm.graph) == before


def test_pass_call_lints_modified_graph():
    class BreakTopo(Pass):
        def call(self, gm):
            nodes = list(gm.graph.nodes)
            # move the output's producer's user before it: break topological order
            relu = next(n for n in nodes if n.op == "call_function" and n.target is torch.relu)
            conv = relu.args[0]
            conv.prepend(relu)
            return PassResult(gm, True)

    gm = trace(Small())
    with pytest.raises(PassError, match="BreakTopo"):
        PassManager([BreakTopo()]).run(gm)


# --------------------------------------------------------------------------- verify

@pytest.mark.filterwarnings("ignore:Failed to fetch module")
def test_lint_reports_missing_module_and_attr():
    gm = trace(Small())
    assert lint(gm) == []
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out), pytest.warns(UserWarning):
        gm.graph.get_attr("nope.weight")
    problems = lint(gm)
    assert any("nope.weight" in p for p in problems)


def test_allclose_and_run_eval():
    a = torch.zeros(2, 3)
    ok, diff = allclose(a, a + 1e-6)
    assert ok and diff == pytest.approx(1e-6, rel=1e-3)
    ok, diff = allclose(a, a + 1.0)
    assert not ok and diff == pytest.approx(1.0)
    assert allclose(a, torch.zeros(3, 2)) == (False, math.inf)
    assert allclose((a, [a]), (a, [a]))[0]
    assert allclose((a, a), (a,)) == (False, math.inf)

    m = nn.Sequential(nn.BatchNorm1d(3))
    m.train()
    out = run_eval(m, torch.randn(4, 3))
    assert m.training  # flag restored
    assert not out.requires_grad


def test_each_checked_pass_costs_one_forward(gm_x):
    gm, x = gm_x
    calls = []
    gm.conv.register_forward_hook(lambda *a: calls.append(1))
    PassManager([NoOpPass(), CountNodes(), NoOpPass()], calibration=x).run(gm)
    assert len(calls) == 4  # reference once, then one "after" per pass (reused as the next reference)
    calls.clear()
    PassManager([NoOpPass(), TrainingLikePass(), NoOpPass()], calibration=x).run(gm)
    assert len(calls) == 2 + 2  # the training pass is not compared: the next pass recomputes its reference

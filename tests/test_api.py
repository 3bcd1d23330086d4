"""relucomp.compile / load_compiled / inspect end to end (tinycnn, 300 synthetic images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import relucomp
import relucomp.api as api
import relucomp.stages.finetune as finetune_stage
import relucomp.stages.search as search_stage
from relucomp.errors import BudgetError, RelucompError
from relucomp.export import ort_run, read_metadata
from relucomp.models import tinycnn
from relucomp.nn import ReLUGate
from relucomp.passes.snl_search import SNLSearchPass
from relucomp.train import Interrupted
from relucomp.verify import onnx_relu_count

pytestmark = pytest.mark.e2e

FAST = dict(limit=300, search_epochs=1, finetune_epochs=1, progress=False)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RELUCOMP_CACHE", str(root / "cache"))
        res = relucomp.api.compile("tinycnn", "synthetic", relu_budget="2k", pretrain_epochs=1,
                                   out_dir=root / "out", **FAST)
    return res, root


def test_compile_writes_verified_onnx_within_budget(compiled):
    res, root = compiled
    out = root / "out"
    assert res.out_dir == out and res.onnx_path == out / "model.onnx"
    assert (out / "model.onnx").is_file() and (out / "model.pt").is_file() and (out / "report.json").is_file()
    assert not (out / "checkpoint.pt").exists()
    assert not list(out.glob(".relucomp-*")) and not list(out.glob("*.tmp"))
    counted = onnx_relu_count(str(out / "model.onnx"))["relus"]
    assert 0 < counted <= 2000
    assert counted == res.relus == res.report["relus"]["after"]
    meta = read_metadata(out / "model.onnx")
    assert meta["onnx_relu_count"] == counted and meta["relu_budget"] == 2000 and meta["architecture"] == "tinycnn"
    # the pretrained dense model went to RELUCOMP_CACHE, not ~/.cache
    assert len(list((root / "cache" / "models").glob("*.pt"))) == 1


def test_report_json_fields(compiled):
    res, root = compiled
    rep = json.loads((root / "out" / "report.json").read_text())
    assert rep["relus"] == {"before": 20_480, "after": res.relus, "budget": 2000, "gate_budget": 2000,
                            "hidden_before": 0, "hidden_after": 0}
    assert rep["comparisons"]["ungated_before"] == 0 and rep["comparisons"]["budget_includes_maxpool"] is False
    assert rep["model"] == "tinycnn" and rep["data"]["name"] == "synthetic"
    assert rep["options"]["relu_budget"] == 2000 and rep["options"]["granularity"] == "pixel"
    assert rep["options"]["search"] == "snl" and rep["options"]["pretrain_epochs"] == 1
    assert [r["site"] for r in rep["per_layer"]] == ["relu1", "relu2", "block.relu1", "block.relu2"]
    assert sum(r["relus_before"] for r in rep["per_layer"]) == 20_480
    assert sum(r["relus_after"] for r in rep["per_layer"]) == res.relus
    assert rep["search"]["hard_relus"] == res.relus and rep["search"]["budget"] == 2000
    assert rep["macs"]["before"] == 1_695_904 and 0 < rep["macs"]["after"] <= rep["macs"]["before"]
    for split in ("before", "after"):
        for k in ("val", "test"):
            assert 0.0 <= rep["accuracy"][split][k] <= 100.0
    assert rep["export"]["onnx_relus"] == res.relus and rep["export"]["ort_max_abs_diff"] < 1e-3
    assert len(rep["search_history"]) == 1 and len(rep["finetune_history"]) == 1
    assert {p["pass"] for p in rep["passes"]} >= {"LowerGatesPass", "FoldBatchNormPass", "ComposeAffinePass"}
    assert {"data", "pretrain", "search", "finetune", "fold", "export"} <= set(rep["phases_seconds"])


def test_compiled_model_matches_onnx_and_reloads(compiled):
    res, root = compiled
    x = torch.randn(5, 3, 32, 32)
    res.model.eval()
    with torch.no_grad():
        ref = res.model(x)
    assert not any(isinstance(m, ReLUGate) for m in res.model.modules())  # lowered
    np.testing.assert_allclose(ort_run(root / "out" / "model.onnx", x.numpy()), ref.numpy(), atol=1e-4, rtol=1e-3)
    for where in (root / "out" / "model.pt", root / "out"):
        loaded = api.load_compiled(where)
        with torch.no_grad():
            assert torch.allclose(loaded(x), ref, atol=1e-5)
        assert api._summary(loaded)["relus_kept"] == res.relus


def test_load_compiled_rejects_other_files(tmp_path):
    bad = tmp_path / "model.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(RelucompError, match="not a relucomp compiled model"):
        api.load_compiled(bad)
    with pytest.raises(RelucompError, match="does not exist"):
        api.load_compiled(tmp_path / "missing.pt")


def test_compile_object_layer_granularity_leaves_user_model_alone(rc_cache):
    torch.manual_seed(0)
    user = tinycnn()
    user.train()
    before = {k: v.clone() for k, v in user.state_dict().items()}
    res = api.compile(user, "synthetic", relu_budget="50%", granularity="layer", **FAST)
    assert user.training and all(p.requires_grad for p in user.parameters())
    assert all(torch.equal(before[k], v) for k, v in user.state_dict().items())
    assert not any(isinstance(m, ReLUGate) for m in user.modules())
    assert res.report["relus"]["budget"] == 10_240
    # layer granularity keeps whole sites (8192 or 4096 ReLUs each)
    assert res.relus <= 10_240 and res.relus % 4096 == 0
    assert all(r["relus_after"] in (0, r["relus_before"]) for r in res.report["per_layer"])
    assert res.onnx_path is None and res.out_dir is None
    assert not rc_cache.exists()  # an object with weights is not pretrained, nothing cached


def test_compile_layer_drop_search(rc_cache):
    res = api.compile("tinycnn", "synthetic", relu_budget=9000, search="layer-drop", pretrain_epochs=0, **FAST)
    st = res.report["search"]
    assert res.relus == st["hard_relus"] <= 9000
    assert set(st["criticality"]) == {"relu1", "relu2", "block.relu1", "block.relu2"}
    kept = {r["site"] for r in res.report["per_layer"] if r["relus_after"]}
    assert kept == set(st["kept_sites"])


def test_compile_input_errors(rc_cache):
    with pytest.raises(BudgetError, match="above the model's 20,480 ReLUs"):
        api.compile("tinycnn", "synthetic", relu_budget="30k", pretrain_epochs=0, **FAST)
    with pytest.raises(BudgetError, match="cannot parse"):
        api.compile("tinycnn", "synthetic", relu_budget="abc", pretrain_epochs=0, **FAST)
    with pytest.raises(RelucompError, match="unknown search method"):
        api.compile("tinycnn", "synthetic", relu_budget="2k", search="random", **FAST)
    with pytest.raises(RelucompError, match="granularity"):
        api.compile("tinycnn", "synthetic", relu_budget="2k", granularity="neuron", pretrain_epochs=0, **FAST)


def test_inspect_api():
    info = api.inspect("tinycnn")
    assert info["total"]["relus"] == 20_480 and info["model"] == "tinycnn" and info["input"] == [3, 32, 32]
    assert [r["name"] for r in info["layers"] if r["kind"] == "relu"] == ["relu1", "relu2", "block.relu1", "block.relu2"]


# --------------------------------------------------------------------------- Ctrl-C and resume

class _InterruptOnEpoch:
    """A train loader that raises KeyboardInterrupt when iterated for the ``epoch``-th time."""

    def __init__(self, loader, epoch):
        self.loader, self.epoch, self.calls = loader, epoch, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.calls += 1
        if self.calls == self.epoch:
            raise KeyboardInterrupt
        return iter(self.loader)


def test_interrupt_saves_checkpoint_and_resume_finishes(rc_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    resumes = []

    class InterruptingSearch(SNLSearchPass):
        def __init__(self, *, train_loader, **kw):
            super().__init__(train_loader=_InterruptOnEpoch(train_loader, 2), **kw)

    class RecordingSearch(SNLSearchPass):
        def __init__(self, **kw):
            resumes.append(kw.get("resume"))
            super().__init__(**kw)

    opts = dict(relu_budget="3k", pretrain_epochs=0, limit=300, search_epochs=2, finetune_epochs=1,
                progress=False, out_dir=out)
    monkeypatch.setattr(search_stage, "SNLSearchPass", InterruptingSearch)
    with pytest.raises(Interrupted) as ei:
        api.compile("tinycnn", "synthetic", **opts)
    assert "search" in ei.value.cause and "--resume" in ei.value.fix
    ckpt = out / "checkpoint.pt"
    assert ckpt.is_file() and not (out / "model.onnx").exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["phase"] == "search" and state["epoch"] == 1
    assert any(k.endswith("alpha") for k in state["model"])

    monkeypatch.setattr(search_stage, "SNLSearchPass", RecordingSearch)
    res = api.compile("tinycnn", "synthetic", resume=True, **opts)
    assert resumes and resumes[0] is not None and resumes[0]["epoch"] == 1
    assert not ckpt.exists()
    assert (out / "model.onnx").is_file()
    assert res.relus <= 3000
    assert [h["epoch"] for h in res.report["search_history"]] == [2]  # only the remaining epoch ran


def test_interrupt_in_finetune_resumes_without_searching_again(rc_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"

    class InterruptingFinetune(finetune_stage.FinetunePass):
        def __init__(self, *, train_loader, **kw):
            super().__init__(train_loader=_InterruptOnEpoch(train_loader, 2), **kw)

    class NoSearch(SNLSearchPass):
        def __init__(self, **kw):
            raise AssertionError("the search ran again although it had finished before the interruption")

    opts = dict(relu_budget="3k", pretrain_epochs=0, limit=300, search_epochs=1, finetune_epochs=2,
                progress=False, out_dir=out, export=False)
    monkeypatch.setattr(finetune_stage, "FinetunePass", InterruptingFinetune)
    with pytest.raises(Interrupted, match="finetune"):
        api.compile("tinycnn", "synthetic", **opts)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "finetune" and state["epoch"] == 1
    assert state["search_stats"]["hard_relus"] <= 3000

    monkeypatch.setattr(finetune_stage, "FinetunePass", InterruptingFinetune.__mro__[1])
    monkeypatch.setattr(search_stage, "SNLSearchPass", NoSearch)
    res = api.compile("tinycnn", "synthetic", resume=True, **opts)
    assert not (out / "checkpoint.pt").exists()
    assert res.relus == state["search_stats"]["hard_relus"]
    assert [h["epoch"] for h in res.report["finetune_history"]] == [2]


def test_top_level_exports():
    import relucomp
    from relucomp import api

    assert relucomp.compile is api.compile
    assert relucomp.load_compiled is api.load_compiled
    assert relucomp.inspect("tinycnn")["total"]["relus"] == 20480
    with pytest.raises(AttributeError):
        relucomp.does_not_exist  # noqa: B018


def test_compile_fairness_and_diagnostics(tmp_path, rc_cache):
    """--fair-groups with CEAG fills the fairness section; --diagnose adds group gradient norms / Hessian eigenvalues."""
    res = api.compile("tinycnn", "synthetic", relu_budget="2k", limit=300, pretrain_epochs=1, search_epochs=1,
                      finetune_epochs=1, fair_groups="group", diagnose=True, progress=False)
    fair = res.report["fairness"]
    assert fair["method"] == "ceag" and fair["groups"] == ["A", "B", "C"]
    test = fair["results"]["last"]["test"]
    psi = [g["psi"] for g in test["groups"].values() if g["psi"] is not None]
    assert test["max_psi"] == pytest.approx(max(psi)) and test["psi_pw"] == pytest.approx(max(psi) - min(psi))
    assert "ema" in fair["results"] and fair["multiplier_trajectory"]
    assert len(fair["multiplier_trajectory"][-1]["multipliers"]) == 3
    diag = res.report["diagnostics"]
    for side in ("dense", "compiled"):
        assert set(diag[side]["grad_norm"]) == {"A", "B", "C"}
        assert all(v is not None and v > 0 for v in diag[side]["grad_norm"].values())
        assert all(v is not None for v in diag[side]["hessian_top_eig"].values())

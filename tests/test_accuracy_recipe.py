"""Accuracy recipe (issue 11): linear replacements and their folding, the search schedule, effort
presets, embedded default weights, and faithful resume of the search / finetune."""

from __future__ import annotations

import copy
import os
import shutil
import signal

import onnx
import pytest
import torch
from torch import nn

from relucomp.api import build_gated, lowering_passes
from relucomp.errors import RelucompError
from relucomp.export import export_onnx
from relucomp.infra import PassManager
from relucomp.nn import ElementwiseAffine, ReLUGate, SparseReLU
from relucomp.passes.insert_gates import gates_of
from relucomp.passes.lower_gates import LowerGatesPass
from relucomp.passes.snl_search import SNLSearchPass, hard_count, select_live
from relucomp.passes.finetune import FinetunePass
from relucomp.recipe import PRESETS, resolve_effort
from relucomp.train import Interrupted
from relucomp.verify import onnx_relu_count


# --------------------------------------------------------------------------- linear replacements

def test_affine_gate_starts_as_snl_gate_and_learns():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    g = ReLUGate((3, 5, 5), "pixel", replacement="affine")
    with torch.no_grad():
        g.alpha.uniform_(0, 1)
    ref = x + g.alpha * (torch.relu(x) - x)
    assert torch.allclose(g(x), ref, atol=1e-6)
    assert g.rep_scale.shape == (1, 3, 1, 1) and g.rep_scale.requires_grad
    g(x).sum().backward()
    assert g.rep_scale.grad is not None and g.rep_scale.grad.abs().sum() > 0
    # identity replacement (SNL) never trains s, b
    assert not ReLUGate((3, 5, 5), "pixel").rep_scale.requires_grad


def test_pinned_entries_pass_gradient_but_output_linear():
    g = ReLUGate((2, 3, 3), "pixel", replacement="affine")
    g.pin_linear_(torch.tensor([0, 1, 2]))
    x = -torch.ones(1, 2, 3, 3)
    y = g(x)
    assert torch.allclose(y.flatten()[:3], x.flatten()[:3])       # pinned: linear (s=1, b=0)
    assert torch.allclose(y.flatten()[3:], torch.zeros(15))       # live (a=1): ReLU
    y.sum().backward()
    assert g.alpha.grad.flatten()[:3].abs().sum() > 0             # shadow score still learns (hysteresis)


class _Net(nn.Module):
    """site 0: BN producer (fold into previous); site 1: after an add, next conv has no padding (fold into
    next); site 2: conv producer with a second reader (no previous fold) and an add consumer (kept)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 1, padding=0)
        self.conv4 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.relu(self.bn1(self.conv1(x)))
        b = torch.relu(self.conv2(a) + a)
        c = self.conv3(b)
        d = torch.relu(c) + c
        return self.fc(self.conv4(d).mean((2, 3)))


def _gated_net(granularity: str, seed: int = 0):
    from tests.conftest import randomize_bn

    torch.manual_seed(seed)
    model = randomize_bn(_Net(), seed).eval()
    x = torch.randn(8, 3, 8, 8)
    gm, _ = build_gated(model, x, granularity=granularity, replacement="affine")
    gen = torch.Generator().manual_seed(seed)
    for g in gates_of(gm).values():
        with torch.no_grad():
            g.rep_scale.copy_(torch.rand(g.rep_scale.shape, generator=gen) + 0.5)
            g.rep_shift.copy_(torch.randn(g.rep_shift.shape, generator=gen) * 0.3)
            g.set_mask((torch.rand(g.alpha.shape, generator=gen) < 0.5).float())
    return gm.eval(), x


def _count(gm, kind) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


def test_affine_replacement_folds_exactly_channel_gates():
    gm, x = _gated_net("channel")
    with torch.no_grad():
        ref = gm(x)
    n_gates = len(gates_of(gm))
    r = LowerGatesPass("sparse").call(gm)
    low = r.gm
    assert r.stats["affine_replacements"] == n_gates == 3
    fold = r.stats["affine_fold"]
    assert fold["folded_into_previous"] == 1 and fold["folded_into_next"] == 1 and fold["kept_elementwise"] == 1
    assert _count(low, ElementwiseAffine) == 1
    with torch.no_grad():
        assert torch.allclose(low(x), ref, atol=1e-5, rtol=1e-5)
    # the rest of the lowering (BN folding, composition) stays exact
    full = PassManager(lowering_passes(x, gate_form="sparse"), calibration=x).run(_gated_net("channel")[0]).gm
    with torch.no_grad():
        assert torch.allclose(full(x), ref, atol=1e-4, rtol=1e-4)


def test_affine_replacement_pixel_gates_stay_elementwise_and_exact():
    gm, x = _gated_net("pixel", seed=3)
    with torch.no_grad():
        ref = gm(x)
    low = LowerGatesPass("sparse").call(gm).gm
    assert _count(low, ElementwiseAffine) == 3          # per-pixel scale/shift: not foldable into a conv
    assert _count(low, SparseReLU) == 3
    with torch.no_grad():
        assert torch.allclose(low(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_affine_replacement_adds_no_relu_to_pi_onnx(tmp_path, granularity):
    gm, x = _gated_net(granularity, seed=1)
    kept = hard_count(gates_of(gm).values())
    with torch.no_grad():
        ref = gm(x)
    ident = copy.deepcopy(gm)
    for g in gates_of(ident).values():
        with torch.no_grad():
            g.rep_scale.fill_(1.0)
            g.rep_shift.fill_(0.0)
    low = PassManager(lowering_passes(x, gate_form="pi"), calibration=x).run(gm).gm
    low_id = PassManager(lowering_passes(x, gate_form="pi"), calibration=x).run(ident).gm
    with torch.no_grad():
        assert torch.allclose(low(x), ref, atol=1e-4, rtol=1e-4)
    res = export_onnx(low, tmp_path / "a.onnx", example=x[:1], verify_batch=x, max_relus=kept)
    export_onnx(low_id, tmp_path / "i.onnx", example=x[:1], verify_batch=x, max_relus=kept)
    assert res["onnx_relus"] == kept == onnx_relu_count(str(tmp_path / "a.onnx"))["relus"]

    def ops(p):
        return [n.op_type for n in onnx.load(str(p)).graph.node]

    comparison = {"Relu", "Max", "Min", "Clip", "Greater", "Less", "LeakyRelu", "Where", "Sign", "Abs"}
    a_ops, i_ops = ops(tmp_path / "a.onnx"), ops(tmp_path / "i.onnx")
    for op in comparison:
        assert a_ops.count(op) == i_ops.count(op), op  # the replacement adds no comparison-bearing node
    if granularity == "pixel":
        assert a_ops.count("Mul") > i_ops.count("Mul")  # it is an elementwise Mul + Add


# --------------------------------------------------------------------------- search schedule

def test_select_live_respects_cost():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.7])
    costs = torch.tensor([4.0, 1.0, 1.0, 2.0])
    assert select_live(scores, costs, 6).tolist() == [True, False, False, True]
    assert select_live(scores, costs, 7).tolist() == [True, False, True, True]


@pytest.fixture(scope="module")
def small_synthetic():
    from relucomp.data import load_data

    return load_data("synthetic", limit=640, seed=0)


def _resnet8_trained(bundle):
    from relucomp.models import load_model

    torch.manual_seed(0)
    return load_model("resnet8", num_classes=bundle.num_classes)


def test_one_epoch_search_spreads_budget_over_layers(small_synthetic):
    from relucomp.loaders import BatchLoader, first_batch

    b = small_synthetic
    model = _resnet8_trained(b)
    x = first_batch(BatchLoader(b.val, batch_size=32), 16)
    gm, _ = build_gated(model, x, granularity="pixel", replacement="affine")
    loader = BatchLoader(b.train, batch_size=64, shuffle=True, augment=True, seed=0)
    teacher = copy.deepcopy(model).eval()
    with pytest.warns(UserWarning, match="too few"):
        r = SNLSearchPass(budget=5000, train_loader=loader, teacher=teacher, epochs=1, refine=1).call(gm)
    kept = r.stats["kept_per_layer"]
    assert sum(kept.values()) == r.stats["hard_relus"] <= 5000
    assert sum(1 for v in kept.values() if v > 0) >= len(kept) / 2, kept
    assert max(kept.values()) < 5000  # not the whole budget in one (the first) layer


# --------------------------------------------------------------------------- presets

def test_effort_presets_resolve_to_documented_epochs():
    assert resolve_effort("quick") == {"pretrain_epochs": 15, "search_epochs": 3, "finetune_epochs": 3,
                                       "batch_size": 128}
    assert resolve_effort("standard") == {"pretrain_epochs": 30, "search_epochs": 10, "finetune_epochs": 10,
                                          "batch_size": 128}
    assert resolve_effort("paper") == {"pretrain_epochs": 200, "search_epochs": 100, "finetune_epochs": 100,
                                       "batch_size": 128}
    assert set(PRESETS) == {"quick", "standard", "paper"}
    # explicit options override the preset
    assert resolve_effort("paper", search_epochs=7, batch_size=64)["search_epochs"] == 7
    assert resolve_effort("paper", search_epochs=7, batch_size=64)["batch_size"] == 64
    assert resolve_effort("paper", search_epochs=7)["finetune_epochs"] == 100
    with pytest.raises(RelucompError, match="unknown effort"):
        resolve_effort("max")
    with pytest.raises(RelucompError):
        resolve_effort("quick", finetune_epochs=-1)


# --------------------------------------------------------------------------- embedded default weights

def test_default_weights_checksum_and_match(tmp_path, monkeypatch, small_synthetic):
    import relucomp.recipe as recipe
    from relucomp.data import load_data
    from relucomp.models import load_model

    meta = recipe.default_weights_info()
    assert meta is not None and recipe.file_sha256(recipe.WEIGHTS_DIR / meta["file"]) == meta["sha256"]
    assert (recipe.WEIGHTS_DIR / meta["file"]).stat().st_size < 1_000_000
    bundle = load_data("synthetic", seed=0)
    sd = recipe.default_pretrained("resnet8", bundle)
    assert sd is not None
    load_model("resnet8", num_classes=10).load_state_dict(sd)  # fits the default model
    assert recipe.default_pretrained(None, bundle) is not None
    assert recipe.default_pretrained("resnet20", bundle) is None     # another model
    assert recipe.default_pretrained("resnet8", small_synthetic) is None  # another split
    # a tampered file is refused (warning, then the caller pretrains)
    d = tmp_path / "w"
    shutil.copytree(recipe.WEIGHTS_DIR, d)
    with open(d / meta["file"], "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    monkeypatch.setattr(recipe, "WEIGHTS_DIR", d)
    with pytest.warns(UserWarning, match="checksum"):
        assert recipe.default_pretrained("resnet8", bundle) is None


# --------------------------------------------------------------------------- faithful resume

class _Interrupter:
    """A progress stand-in that sends SIGINT to this process at a given step."""

    def __init__(self, at: int):
        self.at, self.n = at, 0

    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        self.n += 1
        if self.n == self.at:
            os.kill(os.getpid(), signal.SIGINT)

    def remove_task(self, *a, **k):
        pass


def _state(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


@pytest.mark.parametrize("phase", ["search", "finetune"])
def test_resume_reproduces_uninterrupted_run(phase, small_synthetic):
    from relucomp.loaders import BatchLoader, first_batch
    from relucomp.models import tinycnn

    b = small_synthetic
    x = first_batch(BatchLoader(b.val, batch_size=32), 8)

    def fresh():
        torch.manual_seed(0)
        model = tinycnn(num_classes=10)
        gm, _ = build_gated(model, x, granularity="pixel", replacement="affine")
        if phase == "finetune":
            from relucomp.passes.snl_search import binarize_to_budget

            binarize_to_budget(gates_of(gm), 3000)
        return gm, copy.deepcopy(model).eval(), BatchLoader(b.train, batch_size=64, shuffle=True, augment=True, seed=0)

    def make(loader, teacher, **kw):
        if phase == "search":
            return SNLSearchPass(budget=3000, train_loader=loader, teacher=teacher, epochs=3, refine=0, **kw)
        return FinetunePass(train_loader=loader, teacher=teacher, epochs=3, bn_recalibrate=False, **kw)

    gm, teacher, loader = fresh()
    make(loader, teacher).call(gm)
    ref = _state(gm)

    saved: list[dict] = []
    gm, teacher, loader = fresh()
    with pytest.raises(Interrupted):
        make(loader, teacher, progress=_Interrupter(13), checkpoint=lambda s: saved.append(copy.deepcopy(s))).call(gm)
    assert saved[-1]["loop"]["batch"] == 13 - len(loader)  # mid-epoch 2: the exact batch is recorded
    for ckpt in (saved[-1], saved[0]):  # after SIGINT (mid-epoch), and as after SIGKILL (last epoch end)
        gm, teacher, loader = fresh()
        make(loader, teacher, resume=ckpt).call(gm)
        got = _state(gm)
        for k in ref:
            assert torch.equal(got[k], ref[k]), k

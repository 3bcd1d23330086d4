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
from relucomp.config import CompileConfig, resolve_config, resolve_effort, validate
from relucomp.recipe import PRESETS
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
    def sched(**kw):
        c = resolve_config(None, kw)
        return (c.search.epochs, c.finetune.epochs, c.runtime.batch_size, c.runtime.effort)

    assert sched() == (3, 3, 64, "quick")  # the default effort
    assert sched(effort="standard") == (10, 10, 64, "standard")
    assert sched(effort="paper") == (100, 100, 128, "paper")
    assert {k: (p.pretrain_epochs, p.search_epochs, p.finetune_epochs, p.batch_size) for k, p in PRESETS.items()} == {
        "quick": (15, 3, 3, 64), "standard": (30, 10, 10, 64), "paper": (200, 100, 100, 128)}
    # explicit options override the preset; resolving twice changes nothing
    assert sched(effort="paper", search_epochs=7, batch_size=64) == (7, 100, 64, "paper")
    # the finetune's default peak LR follows the batch linearly (0.01 at 64, the 0.02 tuned at 128)
    from relucomp.recipe import finetune_lr

    assert finetune_lr(64) == pytest.approx(0.01) and finetune_lr(128) == pytest.approx(0.02)
    c = resolve_config(None, {"effort": "paper", "search_epochs": 7})
    assert resolve_effort(c) == c and c.model.pretrain_epochs is None  # pretraining: decided once the model is built
    from relucomp.config import preset_pretrain_epochs

    assert preset_pretrain_epochs(c) == 200 and preset_pretrain_epochs(CompileConfig()) == 15
    # the finetune's KD temperature follows the search's unless set
    assert resolve_config(None, {"search.kd_temperature": 2.0}).finetune.temperature == 2.0
    assert resolve_config(None, {"search.kd_temperature": 2.0, "ft_temperature": 3.0}).finetune.temperature == 3.0
    with pytest.raises(RelucompError, match="unknown effort 'max'"):
        resolve_config(None, {"effort": "max"})
    with pytest.raises(RelucompError, match="--finetune-epochs -1"):
        validate(resolve_config(None, {"relu_budget": "2k", "finetune_epochs": -1}), check_data=False)


@pytest.mark.parametrize("key,value,msg", [
    ("replacement", "relu", "unknown replacement 'relu'"), ("warmup", 1.0, "search.warmup = 1.0 must be in [0, 1)"),
    ("hysteresis", -0.1, "search.hysteresis"), ("refine", -1, "search.refine"),
    ("ft_kd_weight", 1.5, "finetune.kd_weight = 1.5"), ("ft_temperature", 0.0, "finetune.temperature = 0.0"),
    ("kd_temperature", -1.0, "search.kd_temperature")])
def test_recipe_options_validated_up_front(key, value, msg):
    with pytest.raises(RelucompError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as ei:
        validate(resolve_config(None, {"relu_budget": "2k", key: value}), check_data=False)
    assert "\n" not in str(ei.value.cause) and ei.value.fix


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


class _InterruptAtBatch:
    """A train loader that raises KeyboardInterrupt (as Ctrl-C would) before its ``at``-th batch, once."""

    def __init__(self, loader, at: int):
        self.loader, self.at, self.n = loader, at, 0

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            self.n += 1
            if self.n == self.at:
                raise KeyboardInterrupt
            yield batch


def test_cli_resume_mid_search_reproduces_uninterrupted_run(tmp_path, rc_cache, monkeypatch):
    """compile --out, Ctrl-C in the middle of the search, --resume: the masks, weights and accuracy of an
    uninterrupted run (the search's loop state travels through the stage checkpoint)."""
    import json

    from typer.testing import CliRunner

    import relucomp.stages.search as search_stage
    from relucomp.cli import app

    args = ["compile", "tinycnn", "-b", "3k", "--limit", "300", "--pretrain-epochs", "0", "--epochs", "2",
            "--finetune-epochs", "1", "--batch-size", "32", "--no-progress"]
    run = lambda *extra: CliRunner().invoke(app, [str(a) for a in (*args, *extra)])  # noqa: E731
    ref = run("--out", tmp_path / "ref")
    assert ref.exit_code == 0, ref.output

    real = search_stage.SNLSearchPass
    monkeypatch.setattr(search_stage, "SNLSearchPass",
                        lambda **kw: real(**{**kw, "train_loader": _InterruptAtBatch(kw["train_loader"], 10)}))
    r = run("--out", tmp_path / "cut")
    assert r.exit_code == 130 and "--resume" in r.output, r.output
    state = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert state["phase"] == "search" and state["loop"]["batch"] > 0  # cut mid-epoch, the batch recorded
    monkeypatch.setattr(search_stage, "SNLSearchPass", real)
    r = run("--out", tmp_path / "cut", "--resume")
    assert r.exit_code == 0, r.output

    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)["state_dict"]
    masks = [k for k in a if k.endswith(".mask")]
    assert masks and all(torch.equal(a[k], b[k]) for k in masks)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("ref", "cut"))
    assert ra["accuracy"] == rb["accuracy"] and ra["relus"] == rb["relus"]


def test_pretrain_stage_uses_embedded_weights_only_for_the_defaults(rc_cache):
    """The default model on the default data starts from the shipped weights (no pretraining, the report says
    so); an explicit --pretrain-epochs (or a checkpoint, another model or split) does not get them."""
    import relucomp.recipe as recipe
    from relucomp.stages import STAGES, Hooks, run

    stages = STAGES[:3]  # data, model, pretrain
    assert [s.name for s in stages] == ["data", "model", "pretrain"]
    st = run(resolve_config(None, {"relu_budget": "2k", "progress": False}), Hooks(), stages=stages)
    pre = st["pretrain"]
    assert pre.epochs == 0 and pre.info["embedded_weights"].endswith("resnet8_synthetic.pt")
    assert pre.info["sha256"] == recipe.default_weights_info()["sha256"]
    shipped = recipe.default_pretrained("resnet8", st["data"].bundle)
    assert all(torch.equal(v, shipped[k]) for k, v in pre.teacher.state_dict().items())
    st = run(resolve_config(None, {"relu_budget": "2k", "progress": False, "pretrain_epochs": 0}), Hooks(),
             stages=stages)
    assert "embedded_weights" not in st["pretrain"].info and st["pretrain"].epochs == 0
    assert not all(torch.equal(v, shipped[k]) for k, v in st["pretrain"].teacher.state_dict().items())


# --------------------------------------------------------------------------- evaluation cost

def test_run_without_fairness_never_predicts_the_train_split(rc_cache, monkeypatch):
    """The dense train-split predictions and CEAG references are only for fairness: a run without groups
    never computes them; a CEAG run computes each exactly once."""
    import relucomp
    import relucomp.stages.dense as dense_stage

    calls = {"train": 0, "replay": 0}
    real_split, real_replay = dense_stage.predict_split, dense_stage.group_accuracy_like_replay

    def split(*a, **k):
        calls["train"] += 1
        return real_split(*a, **k)

    def replay(*a, **k):
        calls["replay"] += 1
        return real_replay(*a, **k)

    monkeypatch.setattr(dense_stage, "predict_split", split)
    monkeypatch.setattr(dense_stage, "group_accuracy_like_replay", replay)
    fast = dict(limit=300, pretrain_epochs=1, search_epochs=1, finetune_epochs=1, progress=False, export=False)
    res = relucomp.compile("tinycnn", "synthetic", relu_budget="2k", **fast)
    assert calls == {"train": 0, "replay": 0}
    assert res.report.fairness is None
    res = relucomp.compile("tinycnn", "synthetic", relu_budget="2k", fair_groups="group", **fast)
    assert calls == {"train": 1, "replay": 1}
    assert res.report.fairness["dense_train_acc"] > 0


# --------------------------------------------------------------------------- gradient clipping

def test_train_loop_clips_the_gradient_norm_and_records_it():
    from relucomp.train import train_loop

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    data = [(torch.randn(8, 3, 2, 2), torch.randint(0, 4, (8,))) for _ in range(3)]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)   # no momentum: an update is −lr × the clipped gradient
    before = [p.detach().clone() for p in model.parameters()]
    steps: list[float] = []

    def step_fn(m, x, y, g):
        logits = m(x)
        return 1000.0 * nn.functional.cross_entropy(logits, y), logits   # gradients far above the cap

    def after(step):
        if step == 1:
            steps.append(float(torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))))

    hist = train_loop(model, data, epochs=1, optimizer=opt, step_fn=step_fn, after_step=after, clip_grad_norm=0.5)
    assert steps[0] == pytest.approx(0.5, rel=1e-4)   # the first update's norm is the cap
    rec = hist[0]
    assert rec["clipped"] == 1.0 and rec["grad_norm_max"] > 100 and rec["grad_norm_median"] > 0.5
    # off by default: no record keys, no clipping
    hist = train_loop(model, data, epochs=1, optimizer=opt, step_fn=step_fn)
    assert "clipped" not in hist[0]
    with pytest.raises(RelucompError, match="search.clip_grad_norm = 0.0 must be > 0"):
        validate(resolve_config(None, {"relu_budget": "2k", "search.clip_grad_norm": 0.0}), check_data=False)
    assert resolve_config(None, {}).finetune.clip_grad_norm == 5.0   # the recipe's default

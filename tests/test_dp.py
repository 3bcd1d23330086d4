"""Differentially private finetuning (relucomp.dp, opacus): accounting, clipping, BN conversion, export weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("opacus")

import relucomp.api as api  # noqa: E402
from relucomp import dp  # noqa: E402
from relucomp.data import GroupedDataset  # noqa: E402
from relucomp.data.transforms import normalize  # noqa: E402
from relucomp.errors import RelucompError  # noqa: E402
from relucomp.export import ort_run, read_metadata  # noqa: E402
from relucomp.nn import ReLUGate  # noqa: E402
from relucomp.passes.insert_gates import gates_of  # noqa: E402
from relucomp.verify import onnx_relu_count  # noqa: E402


class BNNet(nn.Module):
    """conv-BN-ReLU ×2 + linear head on 8×8 images (BN must be folded for opacus)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def _dataset(n: int = 64, size: int = 8, seed: int = 0) -> GroupedDataset:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=g)
    groups = torch.randint(0, 2, (n,), generator=g)
    return GroupedDataset(imgs, labels, groups, group_names=["a", "b"], class_names=["0", "1", "2"], train=True)


def _gated(make_gated, budget_frac: float = 0.5):
    gm, x = make_gated(BNNet(), "pixel", size=8)
    for gate in gates_of(gm).values():  # fix half of each gate's entries to ReLU (masks are fixed under DP)
        m = (torch.rand_like(gate.alpha) < budget_frac).float()
        gate.set_mask(m)
    return gm, x


def test_bad_options_are_one_line_errors_naming_the_fix():
    ok = dict(n_train=1000)
    assert dp.check_dp_options(epsilon=None, **ok) is None
    for kw, match in [({"epsilon": 0}, "must be > 0"), ({"epsilon": -1}, "must be > 0"),
                      ({"epsilon": 8, "delta": 1e-3}, "must lie in"), ({"epsilon": 8, "delta": 0.0}, "must lie in"),
                      ({"epsilon": 8, "max_grad_norm": 0}, "must be > 0"),
                      ({"epsilon": 8, "phase": "nope"}, "unknown DP phase"),
                      ({"epsilon": 8, "fair_method": "el"}, "per-group losses"),
                      ({"epsilon": 8, "sparsity": 0.9}, "sparsity"),
                      ({"epsilon": 8, "export_weights": "best"}, "unknown export weights"),
                      ({"epsilon": 8, "max_grad_norm": "big"}, "neither a number nor 'auto'"),
                      ({"epsilon": 8, "max_grad_norm": "auto", "phase": "both"}, "auto places C")]:
        with pytest.raises(RelucompError, match=match) as ei:
            dp.check_dp_options(**kw, **ok)
        assert ei.value.fix and "\n" not in ei.value.cause
    o = dp.check_dp_options(epsilon=8, **ok)
    assert o.delta == pytest.approx(1e-5) and o.max_grad_norm == 1.0
    assert dp.check_dp_options(epsilon=8, n_train=10**6).delta == pytest.approx(1e-7)  # default min(1e-5, 0.1/n)
    assert dp.check_dp_options(epsilon=math.inf, **ok).epsilon == math.inf
    assert dp.check_dp_options(epsilon=8, phase="both", **ok).phase == "both"  # the DP mask search exists
    assert dp.check_dp_options(epsilon=8, max_grad_norm="auto", **ok).max_grad_norm == "auto"
    assert dp.check_dp_options(epsilon=8, max_grad_norm="30", **ok).max_grad_norm == 30.0  # CLI text → number


def test_compile_refuses_bad_dp_input_before_training(rc_cache, monkeypatch):
    from relucomp.stages import pretrain as pretrain_stage

    def boom(*a, **k):
        raise AssertionError("trained before validating")

    monkeypatch.setattr(pretrain_stage, "pretrain", boom)
    monkeypatch.setattr(pretrain_stage, "train_loop", boom)
    for kw, match in [({"dp_epsilon": 0}, "must be > 0"), ({"dp_epsilon": float("nan")}, "must be > 0"),
                      ({"dp_epsilon": 8, "dp_delta": 0.5}, "1/n"),  # δ < 1, but ≥ 1/n for n = 140 training images
                      ({"dp_epsilon": 8, "dp_delta": 2.0}, "1/n"),
                      ({"dp_epsilon": 8, "dp_max_grad_norm": -1}, "must be > 0"),
                      ({"dp_epsilon": 8, "dp_batch_size": 0}, "must be ≥ 1"),
                      ({"dp_epsilon": 8, "dp_phase": "both", "search": "layer-drop"}, "search snl"),
                      ({"dp_epsilon": 8, "fair_groups": "group", "fair_method": "el"}, "per-group losses"),
                      ({"dp_epsilon": 8, "fair_groups": "group", "fair_method": "ceag", "fair_phase": "both"},
                       "CEAG runs in the finetune only"),
                      ({"dp_epsilon": 8, "sparsity": 0.5}, "sparsity"),
                      ({"dp_max_grad_norm": 2.0}, "differential privacy is off"),
                      ({"export_weights": "mean"}, "unknown export weights")]:
        with pytest.raises(RelucompError, match=match) as ei:
            api.compile("tinycnn", "synthetic", relu_budget="2k", limit=200, progress=False, **kw)
        assert ei.value.fix and "\n" not in ei.value.cause


def test_unsupported_layer_is_named(make_gated):
    class LSTMish(nn.Module):  # a trainable module opacus has no grad sampler / validator support for
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
            self.fc = nn.Linear(3 * 8 * 8, 3)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.norm(self.conv(x))), 1))

    gm, x = make_gated(LSTMish(), "pixel", size=8)
    with pytest.raises(RelucompError, match="'norm'") as ei:
        dp.make_dp_compatible(gm, x)
    assert "drop --dp-epsilon" in ei.value.fix


def test_bn_folded_exactly_gates_kept(make_gated):
    gm, x = _gated(make_gated)
    with torch.no_grad():
        ref = gm(x)
    conv, changes = dp.make_dp_compatible(gm, x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in conv.modules())
    assert len(gates_of(conv)) == 2 and all(bool(g.hard) for g in gates_of(conv).values())
    assert any("folded 2 BatchNorm" in c for c in changes)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), ref, atol=1e-5, rtol=1e-4)


def _one_step_setup(make_gated):
    """A converted tiny gated net, 12 images, its start weights and trainable parameter names."""
    gm, _ = _gated(make_gated)
    ds = _dataset(n=12)
    x = normalize(ds.images.float() / 255.0, ds.mean, ds.std)
    conv, _ = dp.make_dp_compatible(gm, x[:4])
    start = {k: v.clone() for k, v in conv.state_dict().items()}
    names = [n for n, p in conv.named_parameters() if p.requires_grad]
    return ds, x, conv, start, names


def _clipped_sum_by_hand(conv, ds, x, names, C, weight=lambda i: 1.0):
    """Σ_i weight(i) · clip_C(∇ℓ_i), one backward per image; also the per-image gradient norms."""
    expected = {n: torch.zeros_like(p) for n, p in conv.named_parameters() if n in names}
    norms = []
    conv.train()
    for i in range(len(ds)):
        conv.zero_grad()
        F.cross_entropy(conv(x[i:i + 1]), ds.labels[i:i + 1], reduction="sum").backward()
        grads = {n: p.grad.clone() for n, p in conv.named_parameters() if n in names}
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
        norms.append(norm)
        for n in names:
            expected[n] += grads[n] * min(1.0, C / (norm + 1e-6)) * weight(i)
    return expected, norms


def test_per_sample_gradients_are_clipped(make_gated):
    """q = 1, σ = 0, no momentum: one DP-SGD step equals −lr · mean_i clip_C(∇ℓ_i), computed by hand."""
    ds, x, conv, start, names = _one_step_setup(make_gated)
    assert not any("alpha" in n for n in names)
    C, lr = 0.05, 1.0
    expected, norms = _clipped_sum_by_hand(conv, ds, x, names, C)
    assert min(norms) > 5 * C  # clipping really changes every gradient
    opts = dp.DPOptions(epsilon=math.inf, delta=1e-5, max_grad_norm=C)
    res = dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), lr=lr, momentum=0.0,
                         augment=False, ema=False, convert=False)
    assert res.report["steps"] == 1 and res.report["noise_multiplier"] == 0.0
    after = dict(res.model.named_parameters())
    total = 0.0
    for n in names:
        step = start[n] - after[n].detach()
        torch.testing.assert_close(step, lr * expected[n] / len(ds), atol=2e-6, rtol=1e-4)
        total += float((step ** 2).sum())
    assert math.sqrt(total) <= lr * C + 1e-6  # the averaged clipped step is within the clipping norm


def test_heldout_grad_norms_are_the_per_sample_norms(make_gated):
    """report["heldout_grad_norms"]: the quantiles of the per-image gradient norms (by hand, one backward per
    image) of the held-out split at the starting weights, and the share above C."""
    ds, x, conv, start, names = _one_step_setup(make_gated)
    _, norms = _clipped_sum_by_hand(conv, ds, x, names, 1.0)
    s = sorted(norms)
    C = (s[8] + s[9]) / 2  # 3 of the 12 images lie above C
    opts = dp.DPOptions(epsilon=math.inf, delta=1e-5, max_grad_norm=C)
    res = dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), lr=0.1, momentum=0.0,
                         augment=False, ema=False, convert=False, heldout=ds)
    hn = res.report["heldout_grad_norms"]
    v = torch.tensor(norms, dtype=torch.float64)
    assert hn["images"] == 12 and hn["clipped_share"] == pytest.approx(3 / 12)
    for q in (10, 25, 50, 75, 90):
        assert hn["quantiles"][f"p{q}"] == pytest.approx(float(torch.quantile(v, q / 100)), rel=1e-4)
    assert not any(hasattr(p, "grad_sample") for p in res.model.parameters())


def test_auto_clipping_norm_is_placed_from_the_heldout_norms(make_gated):
    """--dp-max-grad-norm auto: C = the 80th percentile of the held-out per-sample norms (by hand), the recipe's
    LR follows it (lr=None), and the one DP-SGD step (q = 1, σ = 0) is −lr · mean_i clip_C(∇ℓ_i) with that C."""
    ds, x, conv, start, names = _one_step_setup(make_gated)
    _, norms = _clipped_sum_by_hand(conv, ds, x, names, 1.0)
    C = float(torch.quantile(torch.tensor(norms, dtype=torch.float64), dp.AUTO_CLIP_QUANTILE))
    expected, _ = _clipped_sum_by_hand(conv, ds, x, names, C)
    opts = dp.DPOptions(epsilon=math.inf, delta=1e-5, max_grad_norm="auto")
    res = dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), lr=None, momentum=0.0,
                         augment=False, ema=False, convert=False, heldout=ds)
    r = res.report
    assert r["max_grad_norm"] == pytest.approx(C, rel=1e-4) and r["heldout_grad_norms"]["auto"] is True
    assert r["heldout_grad_norms"]["clipped_share"] == pytest.approx(sum(v > C for v in norms) / len(norms))
    lr = 0.1 * len(ds) / 512 / r["max_grad_norm"]
    assert r["lr"] == pytest.approx(lr)
    after = dict(res.model.named_parameters())
    for n in names:
        torch.testing.assert_close(start[n] - after[n].detach(), lr * expected[n] / len(ds), atol=2e-6, rtol=2e-3)
    with pytest.raises(RelucompError, match="validation split"):  # auto without a held-out split
        dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), momentum=0.0, augment=False,
                       ema=False, convert=False)


def test_augmult_averages_each_images_augmentations_before_clipping(make_gated):
    """--dp-augmult K: one step = −lr · Σ_i clip_C(mean_k ∇ℓ(aug_k(x_i))) / B, by hand; K copies per image."""
    ds, x, conv, start, names = _one_step_setup(make_gated)
    K, C, lr = 3, 0.05, 1.0
    xb, yb, gb = next(iter(dp.PoissonLoader(ds, sample_rate=1.0, steps=1, augment=True, seed=0, augmult=K)))
    assert xb.shape[0] == K * len(ds) and yb.shape[0] == len(ds) == gb.shape[0]
    assert any(not torch.equal(xb[i * K], xb[i * K + 1]) for i in range(len(ds)))  # copies are augmented apart
    expected = {n: torch.zeros_like(p) for n, p in conv.named_parameters() if n in names}
    conv.train()
    mean_norms, copy_norms = [], []
    for i in range(len(ds)):
        grads = []
        for k in range(K):  # each copy's own gradient, then their mean
            conv.zero_grad()
            F.cross_entropy(conv(xb[i * K + k:i * K + k + 1]), yb[i:i + 1], reduction="sum").backward()
            grads.append({n: p.grad.clone() for n, p in conv.named_parameters() if n in names})
            copy_norms.append(float(torch.sqrt(sum((g ** 2).sum() for g in grads[-1].values()))))
        mean = {n: sum(g[n] for g in grads) / K for n in names}
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in mean.values())))
        mean_norms.append(norm)
        for n in names:
            expected[n] += mean[n] * min(1.0, C / (norm + 1e-6))
    assert min(mean_norms) > 5 * C
    opts = dp.DPOptions(epsilon=math.inf, delta=1e-5, max_grad_norm=C, augmult=K)
    res = dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), lr=lr, momentum=0.0,
                         augment=True, ema=False, convert=False, seed=0)
    assert res.report["augmult"] == K and res.report["steps"] == 1
    after = dict(res.model.named_parameters())
    for n in names:  # clipped once per image (not per copy): the step is the hand-computed one
        torch.testing.assert_close(start[n] - after[n].detach(), lr * expected[n] / len(ds), atol=2e-6, rtol=1e-4)
    # the same privacy: the plan (q, steps, σ) does not depend on K
    o1, o4 = (dp.check_dp_options(epsilon=2.0, n_train=200, augmult=k) for k in (1, 4))
    p1, p4 = (dp.plan(o, 200, batch_size=50, finetune_epochs=2) for o in (o1, o4))
    assert (p1.sample_rate, p1.steps, p1.sigma) == (p4.sample_rate, p4.steps, p4.sigma) and o4.augmult == 4


def test_accountant_spent_epsilon_within_target_and_ema(make_gated):
    gm, _ = _gated(make_gated)
    ds = _dataset(n=200)
    x = normalize(ds.images[:8].float() / 255.0, ds.mean, ds.std)
    opts = dp.check_dp_options(epsilon=2.0, n_train=len(ds))
    res = dp.dp_finetune(gm, ds, opts, calib=x, epochs=2, batch_size=50, lr=0.05, seed=0)
    r = res.report
    assert r["steps"] == 8 and r["sample_rate"] == pytest.approx(0.25)
    assert r["noise_multiplier"] > 0.5
    assert 0.9 * 2.0 <= r["epsilon_spent"] <= 2.0  # calibrated: reaches, never exceeds, the target
    assert r["history"][-1]["epsilon"] == pytest.approx(r["epsilon_spent"])
    assert r["delta"] < 1 / len(ds)
    # the EMA differs from the last iterate and keeps the gates
    assert res.ema is not None and any(isinstance(m, ReLUGate) for m in res.ema.modules())
    diff = sum(float((a - b).detach().abs().sum()) for a, b in zip(res.model.parameters(), res.ema.parameters()))
    assert diff > 1e-4
    assert not any(hasattr(p, "grad_sample") for p in res.model.parameters())  # opacus state removed


@pytest.mark.e2e
def test_dp_compile_bn_model_to_budget_with_ema_export(tmp_path, rc_cache):
    """tinycnn (BatchNorm) → gates → DP search → DP finetune (folded BN) → PI lowering → verified ONNX = budget,
    exported with the averaged weights, DP numbers in report.json and the ONNX metadata."""
    out = tmp_path / "out"
    res = api.compile("tinycnn", "synthetic", relu_budget="2k", limit=300, pretrain_epochs=1, search_epochs=1,
                      finetune_epochs=2, progress=False, out_dir=out, fair_groups="group",
                      lr=0.2, dp_epsilon=8.0, dp_batch_size=64, dp_phase="both", dp_augmult=2,
                      config={"finetune": {"kd_weight": 0.6, "lr": 0.1}})
    rep = res.report
    d = rep["dp"]
    assert d["kd"] and d["kd_weight"] == 0.6  # the DP finetune follows finetune.kd_weight like the plain one
    assert d["lr"] == pytest.approx(0.1)  # finetune.lr set: the DP optimizer's LR as given (not divided by C)
    assert d["epsilon_spent"] <= 8.0 and d["noise_multiplier"] > 0 and d["max_grad_norm"] == 1.0
    # --dp-phase both: the mask search ran under DP-SGD too, on the same accountant (ε covers both phases)
    assert d["phase"] == "both" and d["steps"] == d["phases"]["search"]["steps"] + d["phases"]["finetune"]["steps"]
    assert 0 < d["phases"]["search"]["epsilon_after"] < d["epsilon_spent"] <= 8.0
    assert rep["search"]["dp"] is True and rep["search"]["refine"]["skipped"] == "DP"
    assert any("BatchNorm" in c for c in d["conversion"])
    assert rep["fairness"]["method"] == "nft"  # measured, not constrained, under DP
    res_f = rep["fairness"]["results"]
    assert set(res_f) == {"last", "ema"}
    for w in ("last", "ema"):
        for k in ("max_psi", "psi_pw"):
            assert res_f[w]["test"][k] is not None
        assert "worst_group_error_ratio" in res_f[w]["test"]
    # exported ONNX: within budget (counted on the graph), averaged weights
    onnx_path = out / "model.onnx"
    assert onnx_relu_count(onnx_path)["relus"] == 2000  # the DP search still hits the budget exactly
    meta = read_metadata(onnx_path)
    assert meta["export_weights"] == "ema" and float(meta["dp_epsilon_spent"]) <= 8.0
    assert float(meta["dp_max_grad_norm"]) == 1.0 and float(meta["dp_delta"]) > 0
    assert d["augmult"] == 2 and int(meta["dp_augmult"]) == 2  # both DP phases averaged 2 augmentations per image
    x = torch.randn(6, 3, 32, 32)
    ema = api.load_compiled(out)  # model.pt holds the exported (averaged) weights
    with torch.no_grad():
        ema_out, last_out = ema(x), res.model.eval()(x)
    onnx_out = ort_run(onnx_path, x.numpy())
    np.testing.assert_allclose(onnx_out, ema_out.numpy(), atol=1e-4, rtol=1e-3)
    to_ema, to_last = np.abs(onnx_out - ema_out.numpy()).max(), np.abs(onnx_out - last_out.numpy()).max()
    assert to_last > 1e-3 and to_last > 20 * to_ema  # not the last iterate
    assert api._summary(ema)["relus_kept"] <= 2000


def test_cli_dp_flags_reach_compile(rc_cache, tmp_path):
    from typer.testing import CliRunner

    from relucomp.cli import app

    runner = CliRunner()
    for args, match in [(["--dp-epsilon", "0"], "must be > 0"), (["--dp-epsilon", "-3"], "must be > 0"),
                        (["--dp-epsilon", "8", "--dp-delta", "0.5"], "1/n"),
                        (["--dp-epsilon", "8", "--dp-max-grad-norm", "0"], "must be > 0"),
                        (["--dp-epsilon", "8", "--dp-max-grad-norm", "big"], "neither a number nor 'auto'"),
                        (["--dp-epsilon", "8", "--dp-phase", "both", "--search", "layer-drop"], "--search snl"),
                        (["--dp-epsilon", "8", "--dp-augmult", "0"], "from 1 to 64"),
                        (["--dp-augmult", "4"], "differential privacy is off"),
                        (["--export-weights", "best"], "unknown export weights")]:
        r = runner.invoke(app, ["compile", "tinycnn", "--relu-budget", "2k", "--limit", "200", "--no-progress",
                                "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2, r.output
        text = "".join(r.output.split())  # rich wraps long lines
        assert "".join(match.split()) in text and "fix:" in text and "Traceback" not in r.output
    # the sweep takes the same flags (validated before any search)
    r = runner.invoke(app, ["sweep", "tinycnn", "--budgets", "1k,2k", "--limit", "200", "--no-progress",
                            "--out", str(tmp_path / "sw"), "--dp-epsilon", "8", "--fair-method", "el"])
    assert r.exit_code == 2 and "per-grouplosses" in "".join(r.output.split()), r.output


def test_zero_epochs_converts_without_training(make_gated):
    gm, _ = _gated(make_gated)
    ds = _dataset(n=40)
    x = normalize(ds.images[:4].float() / 255.0, ds.mean, ds.std)
    with torch.no_grad():
        ref = gm(x)
    res = dp.dp_finetune(gm, ds, dp.check_dp_options(epsilon=1.0, n_train=40), calib=x, epochs=0)
    assert res.report["steps"] == 0 and res.report["epsilon_spent"] == 0.0 and res.ema is None
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), ref, atol=1e-5, rtol=1e-4)


def test_gate_per_sample_gradients_match_autograd(make_gated):
    """The ReLUGate grad sampler (soft score + affine replacement) equals autograd on each sample alone."""
    from opacus import GradSampleModule

    gm, x = make_gated(BNNet(), "channel", size=8)
    gm, _ = dp.make_dp_compatible(gm, x)
    dp.register_gate_sampler()
    for g in gates_of(gm).values():
        g.alpha.data.uniform_(0.2, 0.9)
        g.rep_scale.requires_grad_(True)
        g.rep_shift.requires_grad_(True)
        g.rep_scale.data.uniform_(0.5, 1.5)
    y = torch.tensor([0, 1, 2, 1])
    from relucomp.ir import copy_gm

    gm.train()
    ref = copy_gm(gm)
    gsm = GradSampleModule(gm, batch_first=True, loss_reduction="sum", strict=False)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    gate = next(iter(gates_of(gm).values()))
    ps = {n: p.grad_sample.clone() for n, p in (("alpha", gate.alpha), ("rep_scale", gate.rep_scale),
                                                  ("rep_shift", gate.rep_shift))}
    rgate = next(iter(gates_of(ref).values()))
    for i in range(len(x)):
        for p in ref.parameters():
            p.grad = None
        F.cross_entropy(ref(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for n in ps:
            assert float(ps[n][i].abs().sum()) > 0
            torch.testing.assert_close(ps[n][i], getattr(rgate, n).grad, atol=1e-5, rtol=1e-4)


def test_dp_search_one_budget_over_both_phases(make_gated):
    """--dp-phase both: σ calibrated for search + finetune steps, one accountant, spent ε ≤ target; the
    DP search binarizes to the budget exactly."""
    from relucomp.passes.snl_search import hard_count

    gm, x = make_gated(BNNet(), "pixel", size=8)
    ds = _dataset(n=200)
    opts = dp.check_dp_options(epsilon=3.0, phase="both", n_train=len(ds))
    gm, changes = dp.make_dp_compatible(gm, x)
    plan = dp.plan(opts, len(ds), batch_size=50, search_epochs=2, finetune_epochs=1)
    assert (plan.search_steps, plan.finetune_steps) == (8, 4) and plan.sigma > 0
    plan.conversion = changes  # as the search stage does
    total = sum(g.total_relus for g in gates_of(gm).values())
    budget = total // 3 + 7
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    stats = dp.dp_search(gm, ds, opts, plan, budget=budget, lr=0.05, alpha_lr=0.05, seed=0)
    assert hard_count(gates_of(gm).values()) == stats["hard_relus"] == budget  # exact, never above
    assert all(bool(g.hard) for g in gates_of(gm).values())
    moved = [n for n, p in gm.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    assert any("conv" in n for n in moved)  # the weights trained under DP-SGD too
    eps_search = plan.phases["search"]["epsilon_after"]
    assert 0 < eps_search < 3.0 and plan.accountant.history == [(plan.sigma, 0.25, 8)]
    res = dp.dp_finetune(gm, ds, opts, calib=x, epochs=1, batch_size=50, lr=0.05, dplan=plan)
    r = res.report
    assert r["steps"] == 12 and r["noise_multiplier"] == pytest.approx(plan.sigma)
    assert eps_search < r["epsilon_spent"] <= 3.0 and r["epsilon_spent"] >= 0.9 * 3.0  # both phases counted
    assert r["phases"]["finetune"]["epsilon_after"] == pytest.approx(r["epsilon_spent"])
    assert any("BatchNorm" in c for c in r["conversion"])  # the search's conversion is reported
    assert hard_count(gates_of(res.model).values()) == budget  # masks fixed in the finetune


def test_dp_finetune_resume_after_an_epoch_repeats_the_run(make_gated):
    """Interrupted after epoch 1 (checkpoint written, then Ctrl-C), resumed from the checkpoint: same last
    and EMA weights, same ε, and the accountant holds each step once (nothing double-counted or lost)."""
    import io

    from relucomp.errors import Interrupted
    from relucomp.ir import copy_gm

    gm0, _ = _gated(make_gated)
    ds = _dataset(n=120)
    x = normalize(ds.images[:8].float() / 255.0, ds.mean, ds.std)
    opts = dp.check_dp_options(epsilon=3.0, n_train=len(ds))
    kw = dict(calib=x, epochs=3, batch_size=40, lr=0.1, seed=3)
    full = dp.dp_finetune(copy_gm(gm0), ds, opts, **kw)
    saved = []

    def stop_after_first_epoch(state):
        buf = io.BytesIO()
        torch.save(state, buf)  # as the stage's checkpoint file: plain data, loadable with weights_only
        saved.append(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="step 3/9"):
        dp.dp_finetune(copy_gm(gm0), ds, opts, checkpoint=stop_after_first_epoch, **kw)
    assert saved[0]["step"] == 3 and saved[0]["accountant"] == [[pytest.approx(full.report["noise_multiplier"]),
                                                                   pytest.approx(1 / 3), 3]]
    res = dp.dp_finetune(copy_gm(gm0), ds, opts, resume=saved[0], **kw)
    for a, b in ((res.model, full.model), (res.ema, full.ema)):
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    r, f = res.report, full.report
    assert r["epsilon_spent"] == pytest.approx(f["epsilon_spent"]) and r["epsilon_spent"] <= 3.0
    assert [h["epsilon"] for h in r["history"]] == pytest.approx([h["epsilon"] for h in f["history"]])
    assert [h["step"] for h in r["history"]] == [3, 6, 9]


@pytest.mark.parametrize("warmup", [False, True])
def test_weight_average_decay_and_warmup(warmup):
    """One EMA for every finetune: without warm-up the first iterate keeps decay**(T-1) of the weight after T
    updates; with warm-up (De et al.) the decay is min(decay, (1+t)/(10+t)), so it is forgotten far sooner."""
    from relucomp.train import averaged

    m = torch.nn.Linear(1, 1, bias=False)
    avg = averaged(m, decay=0.9, warmup=warmup)
    expect, T = 0.0, 30
    for t in range(T):
        with torch.no_grad():
            m.weight.fill_(1.0 if t == 0 else 0.0)  # iterate 1 is 1, every later one 0
        avg.update_parameters(m)
        if t == 0:
            expect = 1.0
        else:
            expect *= min(0.9, (1.0 + t) / (10.0 + t)) if warmup else 0.9
    got = float(avg.module.weight)
    assert got == pytest.approx(expect, rel=1e-5)
    assert (got == pytest.approx(0.9 ** (T - 1), rel=1e-5)) is (not warmup)


def test_ema_warmup_default_on_under_dp_only():
    """finetune.ema_warmup: None (default) is on under DP (measured better there) and can be turned off."""
    assert dp.check_dp_options(epsilon=8.0, n_train=1000).ema_warmup is True
    assert dp.check_dp_options(epsilon=8.0, n_train=1000, ema_warmup=False).ema_warmup is False
    from relucomp.config import load_config

    assert load_config({}).finetune.ema_warmup is None  # the non-private finetune's average: no warm-up


def test_ceag_under_dp_weights_clipped_gradients(make_gated):
    """CEAG under DP: with multipliers λ the step is −lr · Σ_i w_g(i) · clip_C(∇ℓ_i) / n with the weights
    1 + λ_g/p_g − Σλ scaled to max 1 — each sample's contribution stays ≤ C (q = 1, σ = 0, by hand)."""
    from relucomp.dp_fairness import HeldOutDuals

    ds, x, conv, start, names = _one_step_setup(make_gated)
    fair = HeldOutDuals(_dataset(n=40, seed=3), dense_group_acc=[50.0, 50.0], dense_acc=50.0, tolerance=2.0,
                        dual_lr=0.1, dual_every=10**6, num_groups=2)
    fair.lam = torch.tensor([0.0, 0.3], dtype=torch.float64)
    p = fair.share
    w = torch.tensor([1.0 - 0.3, 1.0 + 0.3 / float(p[1]) - 0.3])
    w = w / w.max()
    torch.testing.assert_close(fair.group_weights(), w.float())
    assert float(w[0]) < 1.0 and float(w[1]) == 1.0
    C, lr = 0.05, 1.0
    expected, _ = _clipped_sum_by_hand(conv, ds, x, names, C, weight=lambda i: float(w[int(ds.groups[i])]))
    opts = dp.DPOptions(epsilon=math.inf, delta=1e-5, max_grad_norm=C)
    res = dp.dp_finetune(conv, ds, opts, calib=x[:4], epochs=1, batch_size=len(ds), lr=lr, momentum=0.0,
                         augment=False, ema=False, convert=False, fair=fair)
    after = dict(res.model.named_parameters())
    for n in names:
        torch.testing.assert_close(start[n] - after[n].detach(), lr * expected[n] / len(ds), atol=2e-6, rtol=1e-4)
    assert res.report["fairness"]["method"] == "ceag-heldout" and "training split only" in res.report["fairness"]["note"]


def test_heldout_duals_rise_only_for_the_group_that_lost():
    """The dual step reads the held-out split: a model right on group 0 and wrong on group 1 (dense: right on
    both) raises λ_1 by η (ψ_1 − τ) and leaves λ_0 at 0."""
    from relucomp.dp_fairness import HeldOutDuals

    n = 20
    imgs = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    groups = torch.arange(n) % 2
    imgs[groups == 0] = 255  # group 0 bright, group 1 dark
    held = GroupedDataset(imgs, torch.zeros(n, dtype=torch.long), groups, group_names=["a", "b"],
                          class_names=["0", "1"], train=False)

    class Bright(nn.Module):  # class 0 for bright images, 1 for dark ones
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m], 1)

    fair = HeldOutDuals(held, dense_group_acc=[100.0, 100.0], dense_acc=100.0, tolerance=2.0, dual_lr=0.1,
                        dual_every=4, num_groups=2)
    assert not fair.maybe_update(3, Bright()) and fair.lam.tolist() == [0.0, 0.0]
    assert fair.maybe_update(4, Bright())
    # ψ_0 = (1 − 1) − (1 − 0.5) = −0.5, ψ_1 = (1 − 0) − 0.5 = +0.5
    assert fair.lam[0] == 0.0 and float(fair.lam[1]) == pytest.approx(0.1 * (0.5 - 0.02))
    assert fair.trace[-1]["heldout_psi"] == pytest.approx([-50.0, 50.0])
    assert fair.group_weights()[1] == 1.0 and fair.group_weights()[0] < 1.0


@pytest.mark.e2e
def test_dp_compile_with_ceag_duals_on_validation(tmp_path, rc_cache):
    """--fair-method ceag --dp-epsilon: compiles to the budget, the DP report carries the held-out duals'
    multipliers and trace, and ε spent is still within the target (the weighting costs no privacy)."""
    res = api.compile("tinycnn", "synthetic", relu_budget="2k", limit=300, pretrain_epochs=1, search_epochs=1,
                      finetune_epochs=2, progress=False, out_dir=tmp_path / "o", fair_groups="group",
                      fair_method="ceag", dp_epsilon=8.0, dp_batch_size=64, dp_max_grad_norm=4.0)
    rep = res.report
    d = rep["dp"]
    # the LR is per unit of clipping norm: C = 4 divides the recipe's step (a clipped sample moves the weights alike)
    assert d["max_grad_norm"] == 4.0 and d["lr"] == pytest.approx(0.1 * 64 / 512 / 4)
    # the validation split's per-sample gradient norms at the start, and the share C = 4 clips
    hn = d["heldout_grad_norms"]
    q = hn["quantiles"]
    assert hn["split"] == "val" and hn["images"] == 30  # the whole validation split of the 300-image data
    assert 0 < q["p10"] <= q["p25"] <= q["p50"] <= q["p75"] <= q["p90"] and 0.0 <= hn["clipped_share"] <= 1.0
    assert hn["max_grad_norm"] == 4.0
    assert rep["fairness"]["method"] == "ceag" and d["epsilon_spent"] <= 8.0
    f = d["fairness"]
    assert f["method"] == "ceag-heldout" and len(f["trace"]) >= 2 and all(m >= 0 for m in f["multipliers"])
    assert max(f["weights"]) == pytest.approx(1.0) and min(f["weights"]) >= 0.0
    assert onnx_relu_count(tmp_path / "o" / "model.onnx")["relus"] == 2000


def test_dp_recipe_lr_is_per_unit_of_clipping_norm():
    """recipe.dp_finetune_lr: 0.1 at batch 512 and C = 1, linear in the batch, divided by C (dp_clip30.json's
    0.1 / 30 at C = 30), so lr / C · clip_C(g) = lr · clip_1(g / C) moves a clipped sample alike at every C."""
    from relucomp.recipe import dp_finetune_lr

    assert dp_finetune_lr(512, 1.0) == pytest.approx(0.1)
    assert dp_finetune_lr(256, 1.0) == pytest.approx(0.05)
    assert dp_finetune_lr(512, 30.0) == pytest.approx(0.1 / 30)
    g = torch.tensor([3.0, 4.0])  # norm 5: clipped at C = 1 and C = 2, kept at C = 30
    step = {C: dp_finetune_lr(512, C) * g * min(1.0, C / float(g.norm())) for C in (1.0, 2.0, 30.0)}
    torch.testing.assert_close(step[1.0], step[2.0])  # a clipped sample: the same step at any C
    assert float(step[30.0].norm()) < float(step[1.0].norm())  # unclipped: scaled by |g| / C

"""The robust compile (--robust): dual BatchNorm folding, AugMix, the robust steps, the end-to-end compile, bad input."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

from relucomp.cli import app
from relucomp.config import resolve_config, validate
from relucomp.errors import ConfigError
from relucomp.robust_train import (DualBatchNorm2d, RobustTrainSettings, augmix, collapse, dualize, jsd_loss,
                                   robust_kd_step, route, teacher_step)

runner = CliRunner()
needs_ic = pytest.mark.skipif(__import__("importlib").util.find_spec("imagecorruptions") is None,
                              reason="imagecorruptions not installed (pip install 'relucomp[robust]')")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_dual_bn_branches_differ_and_clean_branch_folds_exactly():
    from relucomp.infra import PassManager
    from relucomp.passes.fold_bn import FoldBatchNormPass

    gm = fx.symbolic_trace(_net())
    assert dualize(gm) == 2 and dualize(gm) == 0          # idempotent
    x = torch.randn(16, 3, 12, 12)
    gm.train()
    with route(gm, "perturbed"):                          # perturbed batches move only the perturbed statistics
        gm(x * 3 + 1)
    gm(x)
    duals = [m for m in gm.modules() if isinstance(m, DualBatchNorm2d)]
    assert not torch.allclose(duals[0].clean.running_mean, duals[0].perturbed.running_mean)
    with torch.no_grad():
        for d in duals:                                    # distinct affine parameters too
            d.perturbed.weight.mul_(2.0)
    gm.eval()
    with torch.no_grad():
        clean, pert = gm(x), None
        with route(gm, "perturbed"):
            pert = gm(x)
    assert not torch.allclose(clean, pert)
    assert collapse(gm, "clean") == 2 and not any(isinstance(m, DualBatchNorm2d) for m in gm.modules())
    folded = PassManager([FoldBatchNormPass()]).run(gm).gm
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), clean, rtol=1e-5, atol=1e-5)


def test_augmix_range_shape_mixing_and_jsd():
    torch.manual_seed(0)
    x = torch.rand(32, 3, 32, 32)
    a = augmix(x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.01                     # it changes the images ...
    assert torch.corrcoef(torch.stack([a.flatten(), x.flatten()]))[0, 1] > 0.3   # ... but keeps them related
    torch.manual_seed(1)
    b = augmix(x)
    assert not torch.equal(a, b)
    z = torch.randn(8, 5)
    assert float(jsd_loss(z, z, z)) == pytest.approx(0.0, abs=1e-6)
    assert float(jsd_loss(z, -z, z * 3)) > 0.05


def test_prime_primitives_identity_limits_range_and_op_sets():
    """PRIME's primitives (robustness.augmix_ops): each is the identity at zero strength, changes images at its
    CIFAR-10 ranges, stays a valid image inside AugMix's chains, and is reproducible for a seed."""
    from relucomp.robust_train import OP_SETS, PRIME_OPS, _prime_color, _prime_diffeo, _prime_filter

    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    smooth = torch.nn.functional.avg_pool2d(x, 5, 1, 2)              # a natural-image-like (smooth) batch
    m = torch.rand(16)
    torch.testing.assert_close(_prime_filter(x, m, sigma_max=0.0), x)
    torch.testing.assert_close(_prime_color(x, m, t_max=0.0), x, atol=1e-6, rtol=0)   # tabulated curve: exact
    for op in PRIME_OPS.values():
        y = op(smooth, m)
        assert y.shape == x.shape and torch.isfinite(y).all()
        assert (y.clamp(0, 1) - smooth).abs().mean() > 1e-3, op
    # the deformation is small and smooth: a typical displacement of a pixel or less, not a shuffle
    d = _prime_diffeo(smooth, m)
    assert (d - smooth).abs().mean() < 0.5 * (smooth - smooth.roll(4, -1)).abs().mean()
    assert set(OP_SETS["augmix+prime"]) == set(OP_SETS["augmix"]) | set(PRIME_OPS)
    for name in OP_SETS:
        torch.manual_seed(3)
        a = augmix(smooth, ops=name)
        torch.manual_seed(3)
        assert torch.equal(a, augmix(smooth, ops=name))
        assert a.min() >= 0 and a.max() <= 1 and (a - smooth).abs().mean() > 0.005
    torch.manual_seed(3)
    assert not torch.equal(augmix(smooth, ops="prime"), augmix(smooth, ops="augmix"))


def test_each_step_draws_its_views_from_its_op_set(monkeypatch):
    """The teacher's and the student's steps pass their settings' op set to AugMix (robustness.augmix_ops /
    student_augmix_ops), two views for the teacher's JSD, one for the student's natural KD term."""
    import relucomp.robust_train as rt

    seen = []
    real = rt.augmix
    monkeypatch.setattr(rt, "augmix", lambda x, **k: (seen.append(k.get("ops")), real(x, **k))[1])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    s = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, augmix_ops="prime")
    rt.teacher_step(s)(model, x, y, None)
    assert seen == ["prime", "prime"]
    seen.clear()
    rt.robust_kd_step(model, dataclasses.replace(s, augmix_ops="augmix"), kd_weight=0.5,
                      temperature=4.0)(model, x, y, None)
    assert seen == ["augmix"]


def test_robust_steps_train_and_show_the_attack():
    from relucomp.train import _NullProgress

    class Prog(_NullProgress):
        def __init__(self):
            self.updates = []

        def add_task(self, desc, **k):
            self.desc = desc
            return 7

        def update(self, task, **k):
            self.updates.append(k)

    s = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=2)
    torch.manual_seed(0)
    student, teacher = fx.symbolic_trace(_net()), _net().eval()
    dualize(student)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    prog = Prog()
    step = robust_kd_step(teacher, s, kd_weight=0.5, temperature=4.0, progress=prog)
    loss, logits = step(student.train(), x, y, None)
    loss.backward()
    assert torch.isfinite(loss) and logits.shape == (8, 3)
    assert "PGD-2" in prog.desc and [u["completed"] for u in prog.updates] == [1, 2]
    idle = Prog()                                    # no adversarial term (a clean search): no attack row
    robust_kd_step(teacher, dataclasses.replace(s, kd_adv=0.0), kd_weight=0.5, temperature=4.0, progress=idle)
    assert not hasattr(idle, "desc")
    # the perturbed forwards went through the perturbed BN branch (its statistics moved), the clean one too
    d = next(m for m in student.modules() if isinstance(m, DualBatchNorm2d))
    assert int(d.perturbed.num_batches_tracked) == 2 and int(d.clean.num_batches_tracked) == 1
    # robustness.natural_branch = "clean": the AugMix views train the clean (exported) branch instead
    s_clean = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, natural_branch="clean")
    student2 = fx.symbolic_trace(_net())
    dualize(student2)
    robust_kd_step(teacher, s_clean, kd_weight=0.5, temperature=4.0)(student2.train(), x, y, None)
    d2 = next(m for m in student2.modules() if isinstance(m, DualBatchNorm2d))
    assert int(d2.perturbed.num_batches_tracked) == 1 and int(d2.clean.num_batches_tracked) == 2
    # robustness.clean_teacher = "dense": the clean KD term distils from the given clean teacher, not the robust one
    import torch.nn.functional as F
    from relucomp.train import kd_loss

    s_c = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, kd_natural=0.0, kd_adv=0.0)
    other = _net().eval()
    with torch.no_grad():
        for prm in other.parameters():
            prm.add_(torch.randn_like(prm))
    student3 = fx.symbolic_trace(_net()).eval()  # eval: the loss is a plain function of the weights
    with torch.no_grad():
        out = student3(x)
        want = {name: 0.5 * F.cross_entropy(out, y) + 0.5 * kd_loss(out, t(x), 4.0)
                for name, t in (("robust", teacher), ("dense", other))}
        got_r, _ = robust_kd_step(teacher, s_c, kd_weight=0.5, temperature=4.0)(student3, x, y, None)
        got_d, _ = robust_kd_step(teacher, s_c, kd_weight=0.5, temperature=4.0, clean_teacher=other)(student3, x, y, None)
    assert torch.allclose(got_r, want["robust"]) and torch.allclose(got_d, want["dense"])
    assert not torch.allclose(want["robust"], want["dense"])
    # robustness.student_jsd: + w·JSD(student(x), student(aug₁), student(aug₂)) on the AugMix views of the step
    from relucomp.robust_train import augmix, jsd_loss

    s_j = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, kd_natural=0.0, kd_adv=0.0,
                              student_jsd=3.0)
    with torch.no_grad():
        x01 = (x * 0.25 + 0.5).clamp(0, 1)
        torch.manual_seed(5)
        v1, v2 = ((augmix(x01, ops=s_j.augmix_ops) - 0.5) / 0.25 for _ in range(2))
        want_j = want["robust"] + 3.0 * jsd_loss(out, student3(v1), student3(v2))
        torch.manual_seed(5)
        got_j, _ = robust_kd_step(teacher, s_j, kd_weight=0.5, temperature=4.0)(student3, x, y, None)
    assert torch.allclose(got_j, want_j) and float(want_j - want["robust"]) > 1e-5  # (allclose: rtol 1e-5)
    for attack in ("trades", "pgd"):
        s2 = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, attack=attack)
        loss, _ = teacher_step(s2)(_net().train(), x, y, None)
        assert torch.isfinite(loss) and float(loss.detach()) > 0
    # a dual-BN teacher (clean_teacher = "dual", AdvProp): clean forwards on the clean branch, the TRADES attack,
    # its adversarial forward and the two AugMix views on the perturbed one; on a plain model the same step
    # gives the same loss (the routing is a no-op)
    s3 = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=2)
    t_dual, t_plain = _net(), _net()
    dualize(t_dual)
    torch.manual_seed(3)
    l_dual, _ = teacher_step(s3)(t_dual.train(), x, y, None)
    dd = next(m for m in t_dual.modules() if isinstance(m, DualBatchNorm2d))
    assert int(dd.clean.num_batches_tracked) == 2 and int(dd.perturbed.num_batches_tracked) == 1 + 2  # (the attack runs in eval mode)
    assert torch.isfinite(l_dual)
    torch.manual_seed(3)
    l_plain, _ = teacher_step(s3)(t_plain.train(), x, y, None)
    assert not torch.allclose(l_dual, l_plain)        # separate BN statistics: a different objective


def test_hat_helper_term_is_ce_on_extended_perturbations_labelled_by_the_standard_model(monkeypatch):
    """robustness.helper_weight (HAT): the teacher's step adds γ·CE(model(x + 2·(x_adv − x)), argmax
    standard(x_adv)) — exactly that, on the same adversarial example as the TRADES term; helpers stay in [0, 1]."""
    import dataclasses

    import torch.nn.functional as F

    import relucomp.robust_train as rt

    x01 = torch.tensor([[[[0.1, 0.5, 0.97]]]]).expand(1, 3, 1, 3)
    adv = (x01 + torch.tensor([0.03, -0.03, 0.03]).view(1, 1, 1, 3)).clamp(0, 1)
    h = rt.helper_examples(x01, adv)
    assert torch.allclose(h, torch.tensor([0.16, 0.44, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3))   # 2×, clipped
    assert float(h.min()) >= 0 and float(h.max()) <= 1

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3)).eval()
    standard = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    px = rt._Pixels((0.5,) * 3, (0.25,) * 3)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    x_adv = (px.to01(x) + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    monkeypatch.setattr(rt, "_attack", lambda *a, **k: x_adv)
    s0 = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, augmix=False)
    s1 = dataclasses.replace(s0, helper_weight=0.5)
    with torch.no_grad():
        base, _ = rt.teacher_step(s0)(model, x, y, None)
        got, _ = rt.teacher_step(s1, helper=standard)(model, x, y, None)
        y_help = standard(px.norm(x_adv)).argmax(1)
        want = base + 0.5 * F.cross_entropy(model(px.norm(rt.helper_examples(px.to01(x), x_adv))), y_help)
    assert torch.allclose(got, want) and float(got - base) > 1e-4
    assert not torch.equal(y_help, y)                  # the helper label is the standard model's, not the truth
    with pytest.raises(ValueError, match="helper"):
        rt.teacher_step(s1)


def test_adv_teacher_teaches_the_adversarial_term_only(monkeypatch):
    """robustness.adv_teacher_beta (two teachers): the student's adversarial KD term distils from ``adv_teacher``
    on the same adversarial example — exactly (1 − w)·CE(x) + w·KD(s(x_adv), t_adv(x_adv)) with the other terms
    off — and the clean term still from the robust teacher."""
    import torch.nn.functional as F

    import relucomp.robust_train as rt
    from relucomp.train import kd_loss

    torch.manual_seed(0)
    student, teacher, adv = _net().eval(), _net().eval(), _net().eval()
    with torch.no_grad():
        for prm in adv.parameters():
            prm.add_(torch.randn_like(prm))
    px = rt._Pixels((0.5,) * 3, (0.25,) * 3)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    x_adv = (px.to01(x) + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    monkeypatch.setattr(rt, "_attack", lambda *a, **k: x_adv)
    s = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, augmix=False, kd_clean=0.0,
                            kd_natural=0.0)
    with torch.no_grad():
        xa = px.norm(x_adv)
        ce = F.cross_entropy(student(x), y)
        want = {name: 0.5 * ce + 0.5 * kd_loss(student(xa), t(xa), 4.0) for name, t in (("one", teacher), ("two", adv))}
        got_one, _ = robust_kd_step(teacher, s, kd_weight=0.5, temperature=4.0)(student, x, y, None)
        got_two, _ = robust_kd_step(teacher, s, kd_weight=0.5, temperature=4.0, adv_teacher=adv)(student, x, y, None)
        s_c = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, augmix=False, kd_adv=0.0,
                                  kd_natural=0.0)          # the clean term ignores the adversarial teacher
        got_c, _ = robust_kd_step(teacher, s_c, kd_weight=0.5, temperature=4.0, adv_teacher=adv)(student, x, y, None)
        want_c = 0.5 * ce + 0.5 * kd_loss(student(x), teacher(x), 4.0)
    assert torch.allclose(got_one, want["one"]) and torch.allclose(got_two, want["two"])
    assert not torch.allclose(want["one"], want["two"]) and torch.allclose(got_c, want_c)


def test_a_distilled_teacher_s_robust_term_targets_the_robust_model_s_clean_output(monkeypatch):
    """teacher_step(distill=t): CE(f(x), y) + β·KL(f(x_adv) ‖ t(x)) — the attack and the robust term take t's clean
    output as their target; with t an exact copy of f (no BatchNorm: the same function) the loss is TRADES's."""
    import torch.nn.functional as F

    import relucomp.robust_train as rt

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 3))
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).eval()
    px = rt._Pixels((0.5,) * 3, (0.25,) * 3)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    x_adv = (px.to01(x) + 0.03 * torch.randn_like(x).sign()).clamp(0, 1)
    targets = []

    def attack(model, px_, x01, y_, s_, bar, loss=None):
        targets.append(loss(torch.zeros(6, 3), None))      # KL(uniform ‖ target), summed: names the target
        return x_adv

    monkeypatch.setattr(rt, "_attack", attack)
    s = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, augmix=False, trades_beta=6.0)
    plain, _ = teacher_step(s)(net, x, y, None)
    same, _ = teacher_step(s, distill=copy.deepcopy(net).eval())(net, x, y, None)
    dist, _ = teacher_step(s, distill=other)(net, x, y, None)
    with torch.no_grad():
        want = F.cross_entropy(net(x), y) + 6.0 * F.kl_div(F.log_softmax(net(px.norm(x_adv)), 1),
                                                           F.softmax(other(x), 1), reduction="batchmean")
    assert torch.allclose(plain, same) and torch.allclose(dist, want) and not torch.allclose(dist, plain)
    assert torch.allclose(targets[0], targets[1]) and not torch.allclose(targets[0], targets[2])
    with pytest.raises(ValueError, match="TRADES"):
        teacher_step(dataclasses.replace(s, attack="pgd"), distill=other)


def test_student_starts_from_the_teacher_student_init_names(monkeypatch):
    """robustness.student_init: the student's initial weights are the adversarial term's teacher's perturbed branch
    (the default, with the default two teachers) or the robust teacher's ("robust"); the KD roles stay. One
    teacher (adv_teacher = false, or the robust teacher's settings equal to the second's) trains no second one,
    and the student starts from the robust teacher either way."""
    from types import SimpleNamespace

    import relucomp.stages.robust_teacher as stage
    from relucomp.stages.base import Hooks, RunState

    def trained(seed):                                  # a dual-BN "teacher" with weights of its own
        torch.manual_seed(seed)
        m = fx.symbolic_trace(_net())
        dualize(m)
        with torch.no_grad():
            for prm in m.parameters():
                prm.normal_()
        return m

    teachers = {"robust teacher": trained(1), "adversarial teacher": trained(2)}
    calls = []

    lrs = []

    def fake(st, s, key_info, *, epochs, lr, dual, what, out, distill=None):
        calls.append((what, s.trades_beta, s.helper_weight, key_info.get("helper_weight")))
        lrs.append((round(lr, 12), key_info.get("teacher_lr")))
        return __import__("copy").deepcopy(teachers[what])

    monkeypatch.setattr(stage, "_adversarial_finetune", fake)
    want = {}
    for what, m in teachers.items():
        p = __import__("copy").deepcopy(m)
        collapse(p, "perturbed")
        want[what] = p.state_dict()
    bundle = SimpleNamespace(train=SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3))
    soup = {k: torch.lerp(v, want["adversarial teacher"][k], 0.25) if v.is_floating_point() else v
            for k, v in want["robust teacher"].items()}
    want["weight average: 0.75 robust teacher + 0.25 adversarial teacher"] = soup
    keys = list(want["robust teacher"])                 # layer-wise: the adversarial one's before module 3
    cut = keys.index("3.weight")
    layered = {k: want["adversarial teacher" if i < cut else "robust teacher"][k] for i, k in enumerate(keys)}
    want[f"layer-wise: adversarial teacher before 3 ({cut} tensors), robust teacher from it on"] = layered
    for extra, source, n in (({}, "adversarial teacher", 2), ({"student_init": "robust"}, "robust teacher", 2),
                             ({"student_init": "0.25"}, "weight average: 0.75 robust teacher + 0.25 adversarial "
                                                        "teacher", 2),
                             ({"student_init": "adversarial:3"}, f"layer-wise: adversarial teacher before 3 ({cut} "
                                                                 "tensors), robust teacher from it on", 2),
                             ({"adv_teacher": False}, "robust teacher", 1),
                             ({"trades_beta": 6.0, "helper_weight": 0.0}, "robust teacher", 1),
                             ({"robust_teacher_lr": 0.01}, "adversarial teacher", 2),   # = the default: no key
                             ({"adv_teacher_lr": 0.02}, "adversarial teacher", 2),
                             ({"robust_teacher_lr": 0.03}, "adversarial teacher", 2),
                             ({"trades_beta": 6.0, "helper_weight": 0.0, "adv_teacher_lr": 0.02},
                              "adversarial teacher", 2)):
        cfg = resolve_config(None, {"relu_budget": 100, "robust": True, "robust_teacher_epochs": 1, **extra})
        validate(cfg, check_data=False)
        st = RunState(cfg=cfg, hooks=Hooks())
        student = fx.symbolic_trace(_net())
        st.results.update(pretrain=SimpleNamespace(teacher=_net().eval(), epochs=1),
                          data=SimpleNamespace(bundle=bundle), model=SimpleNamespace(model=student, adv_teacher_from=None))
        calls.clear()
        lrs.clear()
        out = stage.run(st)
        got = student.state_dict()
        assert all(torch.allclose(got[k], want[source][k]) for k in want[source]), extra
        assert out.info["student_init"] == source and len(calls) == n, (extra, calls)
        if n == 2:                                      # the second: TRADES β 6, no helper, none in its key
            assert calls[1] == ("adversarial teacher", 6.0, 0.0, None) and out.info["adv_teacher"]["trades_beta"] == 6
            assert all(torch.equal(a, b) for a, b in zip(out.adversarial.state_dict().values(),
                                                          want["adversarial teacher"].values()))
        else:
            assert out.adversarial is None and "adv_teacher" not in out.info
        # learning rates (the default 0.2 × pretrain_lr = 0.01): the second's is the first's unless set; a
        # teacher's key names its rate only when it is not the default
        lr1 = extra.get("robust_teacher_lr", 0.01)
        want_lrs = [(lr1, None if lr1 == 0.01 else lr1)]
        if n == 2:
            lr2 = extra.get("adv_teacher_lr", lr1)
            want_lrs.append((lr2, None if lr2 == 0.01 else lr2))
        assert lrs == want_lrs, (extra, lrs)


def test_layer_wise_student_init_names_a_layer_of_the_student():
    """"T:prefix" is checked against the student's parameter names by the model stage, before any training: a
    prefix that names nothing, or the first layer (nothing before it), is one error with the layers to choose."""
    from relucomp.config import check_student_init_layers

    names = list(fx.symbolic_trace(_net()).state_dict())
    ok = validate(resolve_config(None, {"relu_budget": 100, "robust": True, "student_init": "robust:3"}),
                  check_data=False)
    check_student_init_layers(ok, names)
    for prefix, frag in (("9", "names no parameter"), ("0", "first layer")):
        cfg = validate(resolve_config(None, {"relu_budget": 100, "robust": True, "student_init": f"robust:{prefix}"}),
                       check_data=False)
        with pytest.raises(ConfigError) as e:
            check_student_init_layers(cfg, names)
        assert frag in e.value.cause and "1, 3, 4" in e.value.fix, str(e.value)


def test_teachers_follow_the_batch_to_its_device():
    """KD teachers live on the CPU between stages; the steps move each to the batch's device at first use
    (``on_device``: under --device cuda the teacher's forward met a CUDA batch). Checked with the meta device."""
    from relucomp.train import ce_kd_step, on_device

    teacher = _net().eval()
    assert on_device(teacher, torch.device("cpu")) is teacher
    student = _net().to("meta")
    x, y = torch.randn(4, 3, 8, 8, device="meta"), torch.zeros(4, dtype=torch.long, device="meta")
    loss, _ = ce_kd_step(teacher, kd_weight=0.5)(student, x, y, None)
    assert loss.device.type == "meta" and next(teacher.parameters()).device.type == "meta"


def test_robust_bad_combinations_are_one_line_errors():
    base = {"relu_budget": 100}
    for extra, frag in (({"robust": True, "search": "layer-drop"}, "--search snl"),
                        ({"robust": True, "dp_epsilon": 8.0}, "--dp-epsilon"),
                        ({"robust": True, "prune_channels": 0.5}, "--prune-channels"),
                        ({"robust": True, "train_attack": "fgsm"}, "trades | pgd"),
                        ({"robust": True, "train_epsilon": 8}, "8/255"),
                        ({"robust": True, "train_attack_steps": 0}, "--train-attack-steps 2"),
                        ({"robust": True, "kd_clean": 0, "kd_natural": 0, "kd_adv": 0}, "kd_clean"),
                        ({"robust": True, "export_branch": "both"}, "clean | perturbed"),
                        ({"robust": True, "natural_branch": "adv"}, "clean | perturbed"),
                        ({"natural_branch": "clean"}, "add --robust"),
                        ({"robust": True, "clean_teacher": "clean"}, "dual | robust | dense"),
                        ({"clean_teacher": "dense"}, "add --robust"),
                        ({"robust": True, "search_objective": "adversarial"}, "robust | clean"),
                        ({"search_objective": "clean"}, "add --robust"),
                        ({"trades_beta": 3.0}, "add --robust"),
                        ({"student_jsd": 12.0}, "add --robust"),
                        ({"robust": True, "student_jsd": -1.0}, "student_jsd = 12"),
                        ({"robust": True, "student_jsd": 12.0, "augmix": False}, "robustness.augmix"),
                        ({"robust": True, "augmix_ops": "randaugment"}, "augmix | prime | augmix+prime"),
                        ({"robust": True, "augmix_ops": "augmix", "augmix": False}, "turn robustness.augmix back on"),
                        ({"augmix_ops": "augmix"}, "add --robust"),
                        ({"robust": True, "student_augmix_ops": "cutout"}, "augmix | prime | augmix+prime"),
                        ({"robust": True, "student_augmix_ops": "augmix", "augmix": False}, "student_augmix_ops"),
                        ({"helper_weight": 1.0}, "add --robust"),
                        ({"robust": True, "helper_weight": -0.5}, "helper_weight = 0.5"),
                        ({"robust": True, "helper_weight": float("nan")}, "helper_weight = 0.5"),
                        ({"robust": True, "helper_weight": 1.0, "teacher_robust": True}, "no adversarial finetune"),
                        ({"robust": True, "helper_weight": 0.0, "robust_teacher_epochs": 0},
                         "drop robustness.helper_weight"),
                        ({"adv_teacher_beta": 4.0}, "add --robust"),
                        ({"adv_teacher": False}, "add --robust"),
                        ({"robust": True, "adv_teacher_beta": -1.0}, "adv_teacher_beta = 6"),
                        ({"robust": True, "adv_teacher_beta": float("inf")}, "adv_teacher_beta = 6"),
                        ({"robust": True, "adv_teacher_beta": 4.0, "teacher_robust": True}, "no adversarial finetune"),
                        ({"robust": True, "adv_teacher_beta": 4.0, "adv_teacher": False}, "adv_teacher = true"),
                        ({"robust": True, "student_init": "dense"}, "adversarial | robust"),
                        ({"robust": True, "student_init": 1.5}, "between 0 and 1"),
                        ({"student_init": "robust"}, "add --robust"),
                        ({"robust": True, "student_init": "dense:layers.2"}, "adversarial | robust"),
                        ({"robust": True, "student_init": "adversarial: "}, "names no layer"),
                        ({"robust_teacher_lr": 0.05}, "add --robust"),
                        ({"robust": True, "robust_teacher_lr": 0.0}, "teacher_lr = 0.01"),
                        ({"robust": True, "robust_teacher_lr": float("nan")}, "teacher_lr = 0.01"),
                        ({"robust": True, "robust_teacher_lr": 0.05, "teacher_robust": True}, "no adversarial finetune"),
                        ({"robust": True, "adv_teacher_lr": -1.0}, "adv_teacher_lr = 0.01"),
                        ({"robust": True, "adv_teacher_lr": 0.02, "adv_teacher": False}, "adv_teacher = true"),
                        ({"adv_teacher_lr": 0.02}, "add --robust"),
                        ({"robustness.adv_teacher_from": "resnet8"}, "add --robust"),
                        ({"robust": True, "robustness.adv_teacher_from": "resnet8"}, "adv_teacher_from_checkpoint"),
                        ({"robust": True, "robustness.adv_teacher_from_checkpoint": __file__}, "give both"),
                        ({"robust": True, "robustness.adv_teacher_from": "resnet8",
                          "robustness.adv_teacher_from_checkpoint": "/no/such/file.pt"}, "is not a file"),
                        ({"robust": True, "robustness.adv_teacher_from": "resnet8", "adv_teacher": False,
                          "robustness.adv_teacher_from_checkpoint": __file__}, "adv_teacher = true"),
                        ({"robust": True, "robustness.adv_teacher_from": "resnet8", "teacher_robust": True,
                          "robustness.adv_teacher_from_checkpoint": __file__}, "no adversarial finetune"),
                        ({"robust": True, "robustness.adv_teacher_from": "resnet8", "kd_adv": 0.0,
                          "student_init": "robust", "robustness.adv_teacher_from_checkpoint": __file__},
                         "nothing reads the second teacher")):
        with pytest.raises(ConfigError) as e:
            validate(resolve_config(None, {**base, **extra}), check_data=False)
        assert frag in f"{e.value.cause} {e.value.fix}", (extra, str(e.value))
    validate(resolve_config(None, {**base, "robust": True, "augmix": False}), check_data=False)  # default op set: fine
    for no_finetune in ({"teacher_robust": True}, {"robust_teacher_epochs": 0}):   # the teacher defaults go unused
        validate(resolve_config(None, {**base, "robust": True, **no_finetune}), check_data=False)
    r = runner.invoke(app, ["compile", "tinycnn", "-b", "2k", "--robust", "--search", "layer-drop", "--out", "x"])
    assert r.exit_code == 2 and "error:" in r.output and "fix:" in r.output and "Traceback" not in r.output


@needs_ic
def test_robust_compile_with_a_one_bn_teacher(tmp_path, monkeypatch):
    """clean_teacher = "robust" (RLNet's: one BN in the teacher, the clean term from the robust teacher) beside
    the default "dual" of the end-to-end test below, with AugMix's own op set for the teacher and PRIME's for the
    student; the export is plain either way.  search_objective = "clean": the mask search's step has its clean
    KD term only, the finetune's all three."""
    import onnx

    import relucomp.robust_train as rt

    steps, real = [], rt.robust_kd_step

    def spy(teacher, s, **kw):
        steps.append((kw["desc"], s.kd_clean, s.kd_natural, s.kd_adv))
        return real(teacher, s, **kw)

    monkeypatch.setattr(rt, "robust_kd_step", spy)

    out = tmp_path / "o"
    (tmp_path / "c.toml").write_text('[robustness]\nclean_teacher = "robust"\naugmix_ops = "augmix"\n'
                                    'student_augmix_ops = "prime"\nhelper_weight = 0.5\ntrades_beta = 2.5\n'
                                    'teacher_lr = 0.003\nsearch_objective = "clean"\n')
    r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--out", str(out), "--limit", "200",
                            "--config", str(tmp_path / "c.toml"), "--pretrain-epochs", "1", "--epochs", "1",
                            "--finetune-epochs", "1", "--no-progress", "--robust", "--robust-teacher-epochs", "1",
                            "--train-attack-steps", "1", "--corruptions", "contrast", "--severities", "3",
                            "--robustness-samples", "20", "--pgd-steps", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    t = rep["robustness"]["robust_compile"]["teacher"]
    assert "teacher_dual_bn" not in t and t["clean_teacher"] == "robust"
    assert "augmix_ops" not in t and t["student_augmix_ops"] == "prime"   # AugMix's ops: cache keys as before
    assert t["helper_weight"] == 0.5 and t["trades_beta"] == 2.5 and t["adversarial_finetune"]   # HAT's teacher
    assert t["teacher_lr"] == t["lr"] == t["adv_teacher"]["lr"] == 0.003    # both teachers' optimizer, in the key
    assert t["search_objective"] == "clean" and steps == [("search", 1.0, 0.0, 0.0), ("finetune", 1.0, 1.0, 1.0)]
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert rep["relus"]["after"] <= rep["relus"]["budget"]


@needs_ic
def test_two_teacher_compile_reuses_the_single_teacher_run_s_cache(tmp_path, rc_cache):
    """The default robust compile trains two teachers — HAT's (β 2.5, helper 0.5) and a TRADES β 6 one for the
    adversarial term, the student starting from the latter — and caches the second under the key a one-teacher run
    at β 6 (the defaults before session 18) has, so that run then trains no teacher at all."""
    args = ["--limit", "200", "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--no-progress",
            "--robust", "--robust-teacher-epochs", "1", "--train-attack-steps", "1", "--corruptions", "contrast",
            "--severities", "3", "--robustness-samples", "20", "--pgd-steps", "1"]
    r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--out", str(tmp_path / "a"), *args])
    assert r.exit_code == 0, r.output
    t = json.loads((tmp_path / "a" / "report.json").read_text())["robustness"]["robust_compile"]["teacher"]
    assert t["trades_beta"] == 2.5 and t["helper_weight"] == 0.5 and "cached" not in t
    assert t["adv_teacher"]["trades_beta"] == 6.0 and len(t["adv_teacher"]["history"]) == 1   # trained: 1 epoch
    assert t["student_init"] == "adversarial teacher"
    files = sorted(rc_cache.rglob("*-robust-*.pt"))
    assert len(files) == 2                                  # two teachers, two keys
    (tmp_path / "one.toml").write_text("[robustness]\ntrades_beta = 6.0\nhelper_weight = 0.0\nadv_teacher = false\n")
    r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--out", str(tmp_path / "b"),
                            "--config", str(tmp_path / "one.toml"), *args])
    assert r.exit_code == 0, r.output
    t1 = json.loads((tmp_path / "b" / "report.json").read_text())["robustness"]["robust_compile"]["teacher"]
    assert t1["trades_beta"] == 6.0 and "adv_teacher" not in t1 and t1["cached"] in map(str, files)
    assert t1["student_init"] == "robust teacher"
    assert sorted(rc_cache.rglob("*-robust-*.pt")) == files  # nothing trained
    # robustness.adv_teacher_from: the second teacher distilled from a given robust model — a teacher of its own
    # (a new cache key holding the model's name and weights), the first teacher reused
    from relucomp.models import build_model

    def distilled(weights: str, out: str) -> dict:
        torch.manual_seed(1)                                # the same weights, whatever the file is called
        torch.save(build_model("tinycnn", num_classes=10).state_dict(), tmp_path / weights)
        r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--out", str(tmp_path / out), *args,
                                "--robustness.adv_teacher_from", "tinycnn",
                                "--robustness.adv_teacher_from_checkpoint", str(tmp_path / weights)])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / out / "report.json").read_text())["robustness"]["robust_compile"]["teacher"]

    t2 = distilled("wide.pt", "c")
    assert t2["cached"] in map(str, files) and len(t2["adv_teacher"]["history"]) == 1
    assert t2["adv_teacher"]["distilled_from"]["model"] == "tinycnn"
    assert len(t2["adv_teacher"]["distilled_from"]["weights_sha1"]) == 12
    assert len(set(rc_cache.rglob("*-robust-*.pt")) - set(files)) == 1
    # the same weights under another file name: the same teacher (its key holds the weights, not the file's bytes)
    t3 = distilled("renamed.pt", "d")
    assert "cached" in t3["adv_teacher"] and t3["adv_teacher"]["distilled_from"] == t2["adv_teacher"]["distilled_from"]


@needs_ic
def test_robust_compile_end_to_end_onnx_budget_and_section(tmp_path):
    import onnx

    out = tmp_path / "o"
    (tmp_path / "c.toml").write_text("[robustness]\ncompare_branches = true\nstudent_jsd = 12\n")
    r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--out", str(out), "--limit", "200",
                            "--config", str(tmp_path / "c.toml"),
                            "--pretrain-epochs", "1", "--epochs", "1", "--finetune-epochs", "1", "--no-progress",
                            "--robust", "--robust-teacher-epochs", "1", "--train-attack-steps", "1",
                            "--corruptions", "contrast", "--severities", "3", "--robustness-samples", "20",
                            "--pgd-steps", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    rb = rep["robustness"]
    rc = rb["robust_compile"]
    assert rc["teacher"]["adversarial_finetune"] and rc["teacher"]["train_attack_steps"] == 1
    assert rc["teacher"]["student_jsd"] == 12.0
    assert rc["teacher"]["augmix_ops"] == "prime"          # the default op set: PRIME's primitives
    assert rc["teacher"]["teacher_dual_bn"] is True and rc["teacher"]["clean_teacher"] == "dual"   # the default
    assert rc["dual_bn_layers"] >= 1 and rc["exported_branch"] == "clean"
    assert len(rc["teacher_history"]) == 1
    assert set(rb["models"]) == {"dense", "compiled", "compiled_perturbed_bn"}   # compare_branches
    for m in rb["models"].values():
        assert all(0.0 <= m[k] <= 100.0 for k in ("ca", "npa", "adva"))
    g = onnx.load(str(out / "model.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert "BatchNormalization" not in ops and ops.count("Relu") >= 1
    assert rep["relus"]["after"] <= rep["relus"]["budget"]
    assert {"robust_teacher", "dual_bn", "dual_bn_export"} <= set(rep["phases_seconds"])
    # model.pt holds plain (collapsed) BN weights: it reloads into the plain gated graph
    from relucomp.api import load_compiled

    gm = load_compiled(out)
    assert not any(isinstance(m, DualBatchNorm2d) for m in gm.modules())
    # relucomp evaluate OUT on a --robust output: the same robust teacher (cache) and compiled model
    r = runner.invoke(app, ["evaluate", str(out), "--corruptions", "contrast", "--severities", "3",
                            "--robustness-samples", "20", "--pgd-steps", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    rb2 = json.loads((out / "report.json").read_text())["robustness"]
    for model in ("dense", "compiled"):
        assert rb2["models"][model]["ca"] == pytest.approx(rb["models"][model]["ca"])


def test_per_group_table_gains_npa_and_adva_columns():
    from types import SimpleNamespace

    from relucomp.report import _group_robustness_columns

    sec = {"models": {"dense": {"groups": {"a": {"ca": 90.0, "npa": 70.0, "adva": 10.0},
                                           "b": {"ca": 80.0, "npa": 60.0, "adva": 5.0}}},
                      "compiled": {"groups": {"a": {"ca": 85.0, "npa": 65.5, "adva": 20.25},
                                              "b": {"ca": 75.0, "npa": 55.0, "adva": 15.0}}}}}
    data = SimpleNamespace(runs=[SimpleNamespace(report={"robustness": sec})])
    hdr, rows = ["budget", "a", "b"], [["dense", "1", "2"], ["100", "3", "4"]]
    _group_robustness_columns(data, ["a", "b"], hdr, rows)
    assert hdr[3:] == ["a NPA", "b NPA", "a AdvA", "b AdvA"]
    assert rows[0][3:] == ["70.00", "60.00", "10.00", "5.00"] and rows[1][3:] == ["65.50", "55.00", "20.25", "15.00"]
    hdr2, rows2 = ["budget", "a"], [["dense", "1"]]
    _group_robustness_columns(SimpleNamespace(runs=[SimpleNamespace(report={})]), ["a", "b"], hdr2, rows2)
    assert hdr2 == ["budget", "a"]                         # no robustness section: the table is unchanged


def test_teacher_cache_key_ignores_student_only_settings():
    """A sweep over the student's KD weights (or BN branches) reuses one robust teacher: its cache digest reads
    only what the teacher's training reads — and the teacher's step indeed ignores the KD weights."""
    from relucomp.robust_train import RobustTrainSettings, teacher_step
    from relucomp.stages.robust_teacher import teacher_digest

    info = {"teacher_epochs": 2, "train_attack": "trades", "train_epsilon": 8 / 255, "trades_beta": 6.0,
            "augmix": True, "jsd_weight": 12.0, "kd_weights": {"clean": 1.0, "natural": 1.0, "adversarial": 1.0},
            "dual_bn": True, "export_branch": "clean", "natural_branch": "perturbed", "clean_teacher": "robust"}
    d = teacher_digest("k", 2, info, 0)
    student = {"kd_weights": {"clean": 1.0, "natural": 3.0, "adversarial": 0.5}, "dual_bn": False,
               "export_branch": "perturbed", "natural_branch": "clean", "clean_teacher": "dense", "student_jsd": 12.0,
               "student_augmix_ops": "augmix", "search_objective": "clean"}
    assert teacher_digest("k", 2, info | student, 0) == d
    for change in ({"trades_beta": 3.0}, {"train_epsilon": 6 / 255}, {"jsd_weight": 0.0}, {"augmix": False},
                   {"teacher_dual_bn": True}, {"augmix_ops": "prime"}, {"helper_weight": 0.5}, {"teacher_lr": 0.05}):
        assert teacher_digest("k", 2, info | change, 0) != d, change
    assert teacher_digest("k", 3, info, 0) != d and teacher_digest("k", 2, info, 1) != d
    assert teacher_digest("other", 2, info, 0) != d

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for kd in ((1.0, 1.0, 1.0), (0.2, 5.0, 0.0)):
        s = RobustTrainSettings(mean=(0.5,) * 3, std=(0.25,) * 3, attack_steps=1, kd_clean=kd[0], kd_natural=kd[1],
                                kd_adv=kd[2])
        torch.manual_seed(0)
        losses.append(float(teacher_step(s)(model, x, y, None)[0]))
    assert losses[0] == losses[1]


def test_a_robust_model_to_distil_from_that_does_not_fit_is_refused_before_training(tmp_path):
    """robustness.adv_teacher_from is loaded and run on the data in the model stage: a checkpoint of another
    shape, or a model that is not there, is one error naming that option, exit 2, before any training."""
    from relucomp.models import build_model

    torch.save(build_model("tinycnn", num_classes=3).state_dict(), tmp_path / "three.pt")
    for spec, fragment in (("tinycnn", "wrong shape"), ("nosuchmodel", "unknown architecture")):
        r = runner.invoke(app, ["compile", "tinycnn", "-b", "50%", "--robust", "--limit", "300", "--no-progress",
                                "--out", str(tmp_path / "o"), "--robustness.adv_teacher_from", spec,
                                "--robustness.adv_teacher_from_checkpoint", str(tmp_path / "three.pt")])
        assert r.exit_code == 2, r.output
        assert "error: robustness.adv_teacher_from:" in r.output and fragment in r.output and "fix:" in r.output
        assert "pretraining" not in r.output and not (tmp_path / "o" / "checkpoint.pt").exists()

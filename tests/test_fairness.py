
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucomp.errors import DataError
from relucomp.fairness import (
    FairConfig,
    FairConfigError,
    FairConstraintTerm,
    GroupReplayBuffer,
    group_constraint_penalty,
)


def tiny_net():
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )


def synthetic(n=240, seed=0):
    """Random 3x8x8 images, 3 classes, 3 imbalanced groups (70/25/5 %)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.multinomial(torch.tensor([0.70, 0.25, 0.05]), n, replacement=True, generator=gen)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    x[torch.arange(n), y] += 0.7  # learnable signal: the label's channel is brighter
    x[g == 2] *= 0.5              # the small group is harder
    return torch.utils.data.TensorDataset(x, y, g)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def grads_of(loss, model):
    return torch.cat([t.flatten() for t in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])


def batch(n=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    g = torch.tensor([0] * (n // 2) + [1] * (n // 3) + [2] * (n - n // 2 - n // 3))
    return x, y, g


# ---------------------------------------------------------------- differentiability


@pytest.mark.parametrize("method", ["ceag", "el"])
def test_lagrangian_term_is_differentiable_and_weights_groups(method):
    model = tiny_net()
    model.eval()  # deterministic BN for repeated forwards
    x, y, g = batch()
    term = FairConstraintTerm(3, method=method, dense_group_acc=[80, 70, 60], dense_acc=75)
    lam = torch.tensor([0.5, 0.0, 2.0])
    with torch.no_grad():
        term.multiplier.weight.copy_(lam[:, None])

    logits = model(x)
    ce = F.cross_entropy(logits, y)
    total = ce + term.loss(logits, y, g)
    grad_total = grads_of(total, model)

    # manual: ∇CE + Σ_g λ_g ∇(CE_g − CE)
    per = F.cross_entropy(model(x), y, reduction="none")
    manual = per.mean() + sum(lam[k] * (per[g == k].mean() - per.mean()) for k in range(3))
    grad_manual = grads_of(manual, model)
    grad_ce = grads_of(F.cross_entropy(model(x), y), model)
    assert torch.allclose(grad_total, grad_manual, atol=1e-6, rtol=1e-5)
    assert (grad_total - grad_ce).norm() > 1e-3 * grad_ce.norm()  # the term does move the gradient
    # the functional form agrees
    pen = group_constraint_penalty(per, g, lam)
    assert torch.allclose(pen, manual - per.mean(), atol=1e-6)


def test_raising_a_multiplier_raises_its_groups_gradient_weight():
    """d(term)/d(loss_i) is the per-sample weight: λ_g/n_g − Σλ/N for a sample of group g."""
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    logits = torch.randn(10, 3)
    y = torch.randint(0, 3, (10,))
    term = FairConstraintTerm(3, method="ceag", dense_group_acc=[90, 90, 90], dense_acc=90)

    def weights(lam):
        with torch.no_grad():
            term.multiplier.weight.copy_(torch.tensor(lam)[:, None])
        per = torch.rand(10, requires_grad=True)
        (w,) = torch.autograd.grad(term.loss(logits, y, g, per_sample_loss=per), per)
        return w

    w_lo, w_hi = weights([0.1, 0.0, 0.0]), weights([0.1, 0.0, 1.0])
    assert torch.allclose(w_lo[6:], torch.full((4,), -0.1 / 10))
    assert torch.allclose(w_hi[6:], torch.full((4,), 1.0 / 4 - 1.1 / 10))
    assert (w_hi[6:] > w_lo[6:]).all() and (w_hi[:6] < w_lo[:6]).all()


def test_primal_lagrangian_keeps_gradient():
    """compile's path (task loss + term.loss) yields ∇(CE + Σλ(CE_g − CE)), not ∇CE."""
    model = tiny_net()
    model.eval()
    x, y, g = batch(seed=1)
    term = FairConstraintTerm(3, method="ceag", dense_group_acc=[80, 70, 60], dense_acc=75)
    with torch.no_grad():
        term.multiplier.weight.copy_(torch.tensor([[1.0], [0.0], [3.0]]))
    logits = model(x)
    lag = F.cross_entropy(logits, y) + term.loss(logits, y, g)
    per = F.cross_entropy(model(x), y, reduction="none")
    manual = per.mean() + 1.0 * (per[g == 0].mean() - per.mean()) + 3.0 * (per[g == 2].mean() - per.mean())
    assert torch.allclose(grads_of(lag, model), grads_of(manual, model), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- dual dynamics


def _fixed_batch():
    """Group 0 all wrong, group 1 all right; logits fixed (no model)."""
    y = torch.zeros(8, dtype=torch.long)
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    logits = torch.zeros(8, 3)
    logits[:4, 1] = 5.0  # wrong
    logits[4:, 0] = 5.0  # right
    return logits, y, g


def test_violated_multiplier_grows_satisfied_stays_zero():
    logits, y, g = _fixed_batch()
    lr = 0.5
    term = FairConstraintTerm(2, method="ceag", dense_group_acc=[100, 100], dense_acc=100,
                              tolerance=2.0, dual_lr=lr)
    weights = []
    for k in range(1, 4):
        per = F.cross_entropy(logits, y, reduction="none").requires_grad_(True)
        term.loss(logits, y, g, per_sample_loss=per).backward()
        weights.append(per.grad[:4].mean().item())
        term.dual_step()
        # ψ_0 = (1 − 0) − (1 − 0.5) = 0.5 ; ψ_1 = (1 − 1) − (1 − 0.5) = −0.5 ; ε = 0.02
        lam = term.multiplier_values()
        assert lam[0] == pytest.approx(k * lr * (0.5 - 0.02), rel=1e-5)
        assert lam[1] == 0.0
    assert weights[0] < weights[1] < weights[2]  # group 0's weight in the gradient grows
    psi = term.psi_estimate()
    assert psi[0] == pytest.approx(50.0, abs=1e-4) and psi[1] == pytest.approx(-50.0, abs=1e-4)
    assert term.replay_accuracy() == [0.0, 100.0]


def test_absent_group_multiplier_not_updated():
    logits, y, g = _fixed_batch()
    term = FairConstraintTerm(3, method="ceag", dense_group_acc=[100, 100, 100], dense_acc=100, dual_lr=0.5)
    g3 = torch.tensor([0, 0, 2, 2, 1, 1, 1, 1])  # group 2 wrong, group 0 half wrong
    term.loss(logits, y, g3)
    term.dual_step()
    lam_before = term.multiplier_values()
    assert lam_before[2] > 0
    for _ in range(3):  # group 2 absent from these batches
        term.loss(logits, y, g)
        term.dual_step()
    lam_after = term.multiplier_values()
    assert lam_after[2] == lam_before[2]
    assert lam_after[0] > lam_before[0]


def test_el_equality_multipliers_are_signed():
    logits, y, g = _fixed_batch()
    term = FairConstraintTerm(2, method="el", dual_lr=0.1)
    for _ in range(2):
        term.loss(logits, y, g)
        term.dual_step()
    lam = term.multiplier_values()
    assert lam[0] > 0 > lam[1]  # group 0 has excess loss, group 1 a deficit
    term_abs = FairConstraintTerm(2, method="el", el_tolerance=0.1, dual_lr=0.1)
    term_abs.loss(logits, y, g)
    term_abs.dual_step()
    lam = term_abs.multiplier_values()
    assert len(lam) == 4 and min(lam) >= 0 and lam[0] > 0 and lam[3] > 0


def test_replay_buffer_keeps_last_samples_per_group():
    b = GroupReplayBuffer(2, size=3)
    b.push(torch.tensor([1, 1, 1, 0, 0]), torch.tensor([0, 0, 0, 0, 1]))
    assert b.group_accuracy()[0].item() == pytest.approx(2 / 3)  # last 3 of group 0: 1,1,0
    assert b.group_accuracy()[1].item() == 0.0
    b.push(torch.tensor([0, 0]), torch.tensor([0, 0]))
    assert b.group_accuracy()[0].item() == 0.0  # 0,0,0
    assert b.seen.tolist() == [6, 1]
    assert b.overall_accuracy().item() == pytest.approx(2 / 6)  # overall ring of 6: 1,1,0,0,0,0
    assert torch.isnan(GroupReplayBuffer(2, 3).group_accuracy()).all()


# ---------------------------------------------------------------- validation


def test_config_and_input_validation():
    with pytest.raises(FairConfigError):
        FairConfig(method="bogus")
    with pytest.raises(FairConfigError):
        FairConstraintTerm(2, method="ceag")  # needs dense accuracies
    with pytest.raises(FairConfigError):
        FairConstraintTerm(2, method="ceag", dense_group_acc=[0.9, 0.8], dense_acc=0.85)  # fractions
    with pytest.raises(FairConfigError):
        FairConstraintTerm(2, method="ceag", dense_group_acc=[90], dense_acc=85)
    term = FairConstraintTerm(2, method="ceag", dense_group_acc=[90, None], dense_acc=85)
    logits, y, _ = _fixed_batch()
    with pytest.raises(DataError):
        term.loss(logits, y, torch.tensor([0, 0, 0, 0, 1, 1, 1, 2]))
    # a group without dense accuracy is unconstrained: only group 0 is observed
    state = term.constraint_state(logits, y, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert state.constraint_features.tolist() == [0]
    assert term.constraint_state(logits, y, torch.ones(8, dtype=torch.long)) is None
    assert term.loss(logits, y, torch.ones(8, dtype=torch.long)).item() == 0.0


# ---------------------------------------------------------------- end to end


def _compile_path(model, teacher, loader, phase, epochs=1, lr=0.05):
    """The one fairness training path: FinetunePass with FairPhase's hooks (as the finetune stage runs it)."""
    from relucomp.infra import PassManager
    from relucomp.passes.finetune import FinetunePass

    fp = FinetunePass(train_loader=loader, teacher=teacher, epochs=epochs, lr=lr, extra_loss=phase.extra_loss,
                      after_step=phase.after_step)
    return PassManager([fp]).run(model).stats["passes"][0]["stats"]


@pytest.mark.parametrize("method", ["nft", "el", "ceag"])
def test_compile_fairness_path_runs_one_epoch(method):
    from relucomp.fair_compile import FairPhase, ema_model
    from relucomp.ir import trace

    ds = synthetic()
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    teacher = tiny_net()
    model = trace(tiny_net())
    before = [p.detach().clone() for p in model.parameters()]
    phase = FairPhase(method=method, num_groups=3, dense_group_acc=[60.0, 55.0, 50.0], dense_acc=58.0, tolerance=2.0,
                      dual_lr=0.5, ema_model=model, record_every=1)
    stats = _compile_path(model, teacher, loader, phase)
    assert len(stats["history"]) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(phase.trajectory) == len(loader)
    if method == "nft":
        assert phase.term.multiplier_values() == []
    else:
        assert all(len(t["multipliers"]) == 3 for t in phase.trajectory)
    if method == "ceag":
        assert len(phase.term.psi_estimate()) == 3 and min(phase.term.multiplier_values()) >= 0
    assert int(phase.ema.n_averaged) == len(loader)
    # EMA weights with BatchNorm statistics recomputed on the data (update_bn), not averaged
    ema = ema_model(model, phase, torch.utils.data.DataLoader(ds, batch_size=40))  # equal batches: exact mean
    bn = next(m for m in ema.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in ema.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        feats = conv(ds.tensors[0])
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert not torch.equal(ema.state_dict()["0.weight"], model.state_dict()["0.weight"])


def test_compile_fairness_path_raises_violated_multipliers():
    from relucomp.fair_compile import FairPhase
    from relucomp.ir import trace

    ds = synthetic(n=120, seed=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=40)
    phase = FairPhase(method="ceag", num_groups=3, dense_group_acc=[60, 60, 60], dense_acc=60, tolerance=0.0,
                      dual_lr=1.0)
    _compile_path(trace(tiny_net()), None, loader, phase, epochs=2, lr=0.01)
    assert len(phase.trajectory) >= 1
    assert max(phase.term.multiplier_values()) > 0  # dense 60 % vs an untrained net: violated


def test_ceag_dense_reference_measured_like_the_replay_buffers():
    """ψ_g compares the compiled model's replay accuracy (train mode, augmented batches) with the
    dense reference: both must be measured the same way.  An oracle with dropout on its logits is
    100 % right in eval mode but far less in train mode; the replay-matched reference agrees with
    what the buffers of an unchanged copy see, the eval-mode one does not."""
    import copy

    from relucomp.data import load_data
    from relucomp.evaluate import predict_split
    from relucomp.fair_compile import FairPhase, group_accuracy_like_replay
    from relucomp.loaders import BatchLoader

    bundle = load_data("synthetic", limit=400, min_group_test=0)
    ds = bundle.train
    ds.images = (ds.labels.view(-1, 1, 1, 1).to(torch.uint8) * 20 + 10).expand(-1, 3, 32, 32).contiguous()
    x0, y0, _ = next(iter(BatchLoader(ds, batch_size=len(ds))))
    centres = torch.stack([x0[y0 == k, 0, 16, 16].mean() for k in range(bundle.num_classes)])

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.6)
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            z = x[:, 0, 16, 16].unsqueeze(1)
            return self.drop(10.0 - (z - centres).abs() * self.scale)

    teacher = Oracle().eval()
    torch.manual_seed(0)
    eval_acc = predict_split(teacher, ds).acc
    like_groups, like_acc = group_accuracy_like_replay(teacher, ds, batch_size=64, seed=1)
    assert eval_acc == 100.0 and not teacher.training
    student = copy.deepcopy(teacher).train()
    phase = FairPhase(method="ceag", num_groups=bundle.num_groups, dense_group_acc=like_groups,
                      dense_acc=like_acc, tolerance=2.0, replay_size=2000)
    with torch.no_grad():
        for _ in range(3):
            for x, y, g in BatchLoader(ds, batch_size=64, shuffle=True, augment=True, seed=5):
                phase.term.observe(student(x), y, g)
    replay = phase.term.replay_overall_accuracy()
    assert abs(replay - like_acc) < 8.0
    assert eval_acc - replay > 20.0
    psi = phase.term.psi_estimate()
    assert max(abs(v) for v in psi if v is not None) < 15.0

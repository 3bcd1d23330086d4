"""FoldBatchNormPass and ComposeAffinePass (positive and negative cases)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relucomp.infra import PassManager
from relucomp.ir import trace
from relucomp.models import resnet8, tinycnn
from relucomp.passes.canonicalize import CanonicalizeReLUPass
from relucomp.passes.compose_affine import ComposeAffinePass, compose_conv, conv_composable
from relucomp.passes.fold_bn import FoldBatchNormPass
from relucomp.passes.shape_prop import ShapeAnalysisPass


def _count(gm, kind):
    return sum(1 for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind))


def _prep(model, x):
    """trace + canonicalize + shapes (what the compiler runs before lowering)."""
    gm = trace(model)
    PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x[:1])]).run(gm)
    return gm


# --------------------------------------------------------------------------- BatchNorm folding

@pytest.mark.parametrize("factory, n_bn", [(tinycnn, 4), (resnet8, 9)])
def test_fold_bn_builtin_models(random_bn, factory, n_bn):
    torch.manual_seed(0)
    model = random_bn(factory()).eval()
    x = torch.randn(4, 3, 32, 32)
    gm = _prep(model, x)
    n_conv = _count(gm, nn.Conv2d)
    assert _count(gm, nn.BatchNorm2d) == n_bn
    n_nodes = len(gm.graph.nodes)
    pm = PassManager([FoldBatchNormPass()], calibration=x)
    gm = pm.run(gm).gm
    assert pm.records[0].stats["folded"] == n_bn and pm.records[0].stats["skipped"] == []
    assert _count(gm, nn.BatchNorm2d) == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert _count(gm, nn.Conv2d) == n_conv
    assert len(gm.graph.nodes) == n_nodes - n_bn
    assert gm.conv1.bias is not None
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)
    assert FoldBatchNormPass()(gm).modified is False


def test_fold_bn_skips_bn_in_training_mode(random_bn):
    model = random_bn(tinycnn())
    x = torch.randn(4, 3, 32, 32)
    gm = _prep(model, x)
    gm.train()
    r = FoldBatchNormPass()(gm)
    assert r.modified is False and r.stats["folded"] == 0 and len(r.stats["skipped"]) == 4
    assert all("training" in s for s in r.stats["skipped"])
    gm.eval()
    gm.block.bn2.train()  # just one BN still collecting statistics
    r = FoldBatchNormPass()(gm)
    assert r.stats["folded"] == 3 and r.stats["skipped"] == ["block.bn2: training mode / no running stats"]
    assert _count(gm, nn.BatchNorm2d) == 1


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y) + y  # conv output has a second user
        return self.bn2(self.conv2(z))


def test_fold_bn_negative_cases(random_bn):
    model = random_bn(SharedConvOutput()).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = _prep(model, x)
    r = PassManager([FoldBatchNormPass()], calibration=x).run(gm)
    st = r.stats["passes"][0]["stats"]
    assert r.modified is False and st["folded"] == 0
    assert st["skipped"] == ["bn: producer output is shared", "bn2: training mode / no running stats"]
    assert _count(gm, nn.BatchNorm2d) == 2


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3, bias=False)
        self.bn2 = nn.BatchNorm1d(3, affine=False)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.bn2(self.fc2(torch.relu(self.bn(self.fc1(x)))))


def test_fold_linear_batchnorm1d(random_bn):
    model = random_bn(LinearBN()).eval()
    x = torch.randn(5, 3, 2, 2)
    gm = trace(model)
    PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x[:1])]).run(gm)
    r = PassManager([FoldBatchNormPass()], calibration=x).run(gm)
    assert r.stats["passes"][0]["stats"]["folded"] == 2
    assert _count(gm, nn.BatchNorm1d) == 0 and gm.fc2.bias is not None
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_fold_linear_batchnorm1d_not_on_3d_outputs(random_bn):
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(5)  # normalizes dim 1 (length 5), not the features

        def forward(self, x):
            return self.bn(self.fc(x))

    model = random_bn(Seq()).eval()
    x = torch.randn(4, 5, 6)
    gm = trace(model)
    ShapeAnalysisPass(x[:1])(gm)
    r = FoldBatchNormPass()(gm)
    assert r.modified is False and "not known to be (N, features)" in r.stats["skipped"][0]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))


# --------------------------------------------------------------------------- affine composition

class TwoConvs(nn.Module):
    def __init__(self, c1: nn.Conv2d, c2: nn.Conv2d, tail: bool = True):
        super().__init__()
        self.c1, self.c2 = c1, c2
        self.tail = tail

    def forward(self, x):
        y = self.c2(self.c1(x))
        return torch.relu(y) if self.tail else y


def _compose(model, x, policy="macs"):
    gm = _prep(model, x)
    n0 = _count(gm, nn.Conv2d) + _count(gm, nn.Linear)
    pm = PassManager([ComposeAffinePass(policy)], calibration=x)
    res = pm.run(gm)
    gm = res.gm
    n1 = _count(gm, nn.Conv2d) + _count(gm, nn.Linear)
    with torch.no_grad():
        ok = torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)
    return gm, n0 - n1, res.stats["passes"][0]["stats"], ok


@pytest.mark.parametrize("c1, c2, fused_kernel", [
    (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), 3),                     # 3x3(pad1) then 1x1(pad0)
    (nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 4, 3, padding=1), 3),         # bias-free 1x1 then 3x3(pad1)
    (nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.Conv2d(8, 4, 3, padding=1), 5),  # strided 1x1: K = 1 + 2*2
    (nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.Conv2d(6, 4, 2, stride=2), 5),  # 3x3/s2 then 2x2/s2 (pad0)
])
def test_compose_convs_exact(c1, c2, fused_kernel):
    torch.manual_seed(0)
    model = TwoConvs(c1, c2).eval()
    x = torch.randn(2, 3, 11, 11)
    gm, removed, st, ok = _compose(model, x, "always")
    assert removed == 1 and st["composed"] == 1 and ok
    fused = gm.c2
    assert fused.kernel_size == (fused_kernel, fused_kernel)
    assert not hasattr(gm, "c1")
    assert ComposeAffinePass("always")(gm).modified is False


def test_compose_macs_policy_applies_when_macs_do_not_grow():
    torch.manual_seed(0)
    model = TwoConvs(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, removed, st, ok = _compose(model, x, "macs")
    assert removed == 1 and ok  # 8*3*9 + 4*8 = 248 > 4*3*9 = 108 MACs per pixel


def test_compose_3x3_pad1_twice_is_not_composed():
    torch.manual_seed(0)
    c1, c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    assert not conv_composable(c1, c2)
    # the naive composition really is wrong at the border
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        naive = compose_conv(c1, c2)(x)
        true = c2(c1(x))
    assert naive.shape == true.shape and not torch.allclose(naive, true, atol=1e-3)
    model = TwoConvs(c1, c2).eval()
    gm, removed, st, ok = _compose(model, torch.randn(2, 3, 8, 8), "always")
    assert removed == 0 and st["composed"] == 0 and st["skipped"] >= 1 and ok


def test_compose_1x1_with_bias_then_padded_conv_is_not_composed():
    c1, c2 = nn.Conv2d(3, 4, 1, bias=True), nn.Conv2d(4, 4, 3, padding=1)
    assert not conv_composable(c1, c2)
    with torch.no_grad():
        c1.bias.zero_()
    assert conv_composable(c1, c2)  # a zero bias is as good as none
    assert not conv_composable(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 1))
    assert not conv_composable(nn.Conv2d(4, 4, 3, dilation=2), nn.Conv2d(4, 4, 1))


def test_compose_macs_policy_refuses_growth_always_does_it():
    torch.manual_seed(0)
    # 16 -> 2 -> 16 bottleneck: before 2*16*9 + 16*2 = 320 MACs/pixel, after 16*16*9 = 2304
    make = lambda: TwoConvs(nn.Conv2d(16, 2, 3, padding=1), nn.Conv2d(2, 16, 1)).eval()  # noqa: E731
    model = make()
    x = torch.randn(2, 16, 6, 6)
    gm, removed, st, ok = _compose(model, x, "macs")
    assert removed == 0 and st["skipped"] >= 1 and ok
    gm, removed, st, ok = _compose(model, x, "always")
    assert removed == 1 and ok
    # without shape metadata "macs" cannot decide and refuses
    gm = trace(model)
    assert ComposeAffinePass("macs")(gm).modified is False
    with pytest.raises(ValueError):
        ComposeAffinePass("fewest")


class Linears(nn.Module):
    def __init__(self, shared=False):
        super().__init__()
        self.l1 = nn.Linear(12, 8)
        self.l2 = nn.Linear(8, 6)
        self.l3 = nn.Linear(6, 4, bias=False)
        self.shared = shared

    def forward(self, x):
        h = self.l2(self.l1(x))
        out = self.l3(h)
        return out + h[:, :4] if self.shared else out


def test_compose_linear_chain():
    torch.manual_seed(0)
    model = Linears().eval()
    x = torch.randn(5, 12)
    gm, removed, st, ok = _compose(model, x, "always")
    assert removed == 2 and st["composed"] == 2 and ok
    assert _count(gm, nn.Linear) == 1
    lin = next(m for m in gm.modules() if isinstance(m, nn.Linear))
    assert (lin.in_features, lin.out_features) == (12, 4)
    assert ComposeAffinePass("always")(gm).modified is False


def test_compose_skips_shared_intermediate():
    torch.manual_seed(0)
    model = Linears(shared=True).eval()
    x = torch.randn(5, 12)
    gm, removed, st, ok = _compose(model, x, "always")
    assert removed == 1 and ok  # l1∘l2 composed; l2's output (h) has two users: l3 not composed
    assert _count(gm, nn.Linear) == 2


def test_compose_linear_macs_policy():
    # 4 -> 64 -> 4: l2∘l1 costs 4*4 = 16 < 4*64 + 64*4: composed under "macs"
    seq = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 4)).eval()
    x = torch.randn(3, 4)
    gm, removed, st, ok = _compose(seq, x, "macs")
    assert removed == 1 and ok
    # 64 -> 2 -> 64: composing costs 64*64 = 4096 > 64*2 + 2*64
    seq = nn.Sequential(nn.Linear(64, 2), nn.Linear(2, 64)).eval()
    gm, removed, st, ok = _compose(seq, torch.randn(3, 64), "macs")
    assert removed == 0 and st["skipped"] == 1 and ok


def test_fold_then_compose_after_linearization(random_bn):
    """conv-BN-(linearized ReLU)-conv1x1 collapses to one conv."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))

    model = random_bn(M()).eval()
    x = torch.randn(3, 3, 8, 8)
    gm = _prep(model, x)
    gm = PassManager([FoldBatchNormPass(), ComposeAffinePass("macs")], calibration=x).run(gm).gm
    assert _count(gm, nn.Conv2d) == 1 and _count(gm, nn.BatchNorm2d) == 0
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4)

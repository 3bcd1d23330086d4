"""Front-end passes: CanonicalizeReLUPass, DeadCodeEliminationPass, ShapeAnalysisPass."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from relucomp.infra import PassManager
from relucomp.ir import meta, relu_nodes, trace
from relucomp.models import resnet8, resnet18, tinycnn
from relucomp.passes.canonicalize import CanonicalizeReLUPass
from relucomp.passes.dce import DeadCodeEliminationPass
from relucomp.passes.shape_prop import ShapeAnalysisPass, layer_table


class AllSpellings(nn.Module):
    """Every ReLU spelling, with in-place forms whose input is read again afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.r = nn.ReLU()
        self.r_inplace = nn.ReLU(inplace=True)
        self.shared = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.conv(x)
        a = self.r(x)                          # 1 nn.ReLU
        pre = self.conv2(a) - 0.3
        early = pre * 2.0                      # read BEFORE the in-place ReLU: sees the raw value
        b = self.r_inplace(pre)                # 2 nn.ReLU(inplace=True)
        y1 = pre + b + early                   # eager: pre is rectified by now
        s1 = self.shared(x[:, :2])             # 3 shared module, first use
        s2 = self.shared(-x[:, 2:])            # 4 shared module, second use
        f = F.relu(x - 0.1)                    # 5 F.relu
        t = x * 1.5 - 0.4
        u = F.relu(t, inplace=True)            # 6 F.relu(inplace=True)
        y2 = t + u
        v = torch.relu(x - 0.2)                # 7 torch.relu
        w = x * -1.0 + 0.3
        torch.relu_(w)                         # 8 torch.relu_ (result discarded, w read later)
        z = (x - 0.5).relu()                   # 9 x.relu()
        q = x - 0.2
        q.relu_()                              # 10 x.relu_() (result discarded)
        return torch.cat([a, y1, s1, s2, f, y2, v, w, z, q], 1)


N_SPELLED = 10


def _eager(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).eval()(x.clone())


def test_canonicalize_all_spellings():
    torch.manual_seed(0)
    model = AllSpellings().eval()
    x = torch.randn(2, 3, 8, 8)
    expected = _eager(model, x)
    gm = trace(model)
    assert len(relu_nodes(gm)) == N_SPELLED
    res = CanonicalizeReLUPass()(gm)
    assert res.modified is True and res.stats["converted"] == N_SPELLED - 1  # torch.relu already canonical
    nodes = relu_nodes(gm)
    assert len(nodes) == N_SPELLED
    for n in nodes:
        assert n.op == "call_function" and n.target is torch.relu and not n.kwargs and len(n.args) == 1
    assert not any(n.op == "call_module" for n in gm.graph.nodes if n.target in ("r", "r_inplace", "shared"))
    assert not any(n.op == "call_method" for n in gm.graph.nodes)
    sites = [meta(n)["site"] for n in nodes]
    assert len(set(sites)) == len(sites)
    assert sites[:4] == ["r", "r_inplace", "shared", "shared#1"]
    assert all(meta(n)["kind"] == "relu" for n in nodes)
    with torch.no_grad():
        got = gm(x.clone())
    assert expected.std() > 0.1 and (expected < 0).any()  # not a degenerate output
    assert torch.allclose(got, expected, atol=1e-6), (got - expected).abs().max()
    # each discarded in-place result still rectified what is read later
    assert got.shape[1] == 36
    assert (got[:, 24:28] >= 0).all() and (got[:, 32:36] >= 0).all()  # w and q
    # the in-place forms really mattered: ignoring them changes the output
    naive = AllSpellings()
    naive.load_state_dict(model.state_dict())
    naive.r_inplace.inplace = False
    assert not torch.allclose(_eager(naive, x), expected)
    # idempotent
    again = CanonicalizeReLUPass()(gm)
    assert again.modified is False and again.stats["converted"] == 0


def test_canonicalize_under_pass_manager_checks_equivalence():
    torch.manual_seed(1)
    model = AllSpellings().eval()
    x = torch.randn(3, 3, 8, 8)
    gm = PassManager([CanonicalizeReLUPass(), DeadCodeEliminationPass()], calibration=x).run(trace(model)).gm
    assert len(relu_nodes(gm)) == N_SPELLED  # discarded in-place results are still live
    assert torch.allclose(gm(x), _eager(model, x), atol=1e-6)


def test_canonicalize_site_names_unique_when_function_and_module_names_clash():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            x = torch.relu(x)          # node named "relu"
            return self.relu(self.conv(x))  # module path "relu"

    gm = trace(Clash())
    CanonicalizeReLUPass()(gm)
    sites = [meta(n)["site"] for n in relu_nodes(gm)]
    assert len(sites) == 2 and len(set(sites)) == 2, sites


def test_canonicalize_sites_of_builtin_model_are_module_paths():
    gm = trace(tinycnn())
    CanonicalizeReLUPass()(gm)
    assert [meta(n)["site"] for n in relu_nodes(gm)] == ["relu1", "relu2", "block.relu1", "block.relu2"]
    # already canonical nodes only get a name: second run is a no-op
    assert CanonicalizeReLUPass()(gm).modified is False


# --------------------------------------------------------------------------- DCE

class WithDeadCode(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Conv2d(3, 3, 1)
        self.dead = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        _ = self.dead(x)
        _ = x * 3 + 1
        return self.used(x)


def test_dce_removes_unused_nodes_and_modules():
    model = WithDeadCode().eval()
    x = torch.randn(2, 3, 4, 4)
    gm = trace(model)
    n0 = len(gm.graph.nodes)
    res = PassManager([DeadCodeEliminationPass()], calibration=x).run(gm)
    gm = res.gm
    assert res.modified is True
    st = res.stats["passes"][0]["stats"]
    assert st == {"removed_nodes": 3, "removed_modules": 1}
    assert len(gm.graph.nodes) == n0 - 3
    assert not hasattr(gm, "dead") and hasattr(gm, "used")
    assert torch.allclose(gm(x), model(x))
    assert DeadCodeEliminationPass()(gm).modified is False


def test_dce_on_clean_model_is_noop():
    gm = trace(tinycnn())
    r = DeadCodeEliminationPass()(gm)
    assert r.modified is False and r.stats == {"removed_nodes": 0, "removed_modules": 0}


# --------------------------------------------------------------------------- shapes, ReLUs, MACs

def _analyze(model, size=32):
    gm = trace(model)
    x = torch.randn(1, 3, size, size)
    pm = PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x)])
    gm = pm.run(gm).gm
    return gm, pm.records[-1]


def test_shape_analysis_resnet18_counts():
    gm, rec = _analyze(resnet18())
    assert rec.modified is False
    assert rec.stats["relus"] == 557_056 == rec.stats["relus_kept"]
    assert rec.stats["macs"] == 555_422_720
    assert rec.stats["maxpool_comparisons"] == 0
    rows = layer_table(gm)
    relu_rows = [r for r in rows if r["kind"] == "relu"]
    assert len(relu_rows) == 17
    assert relu_rows[0] == {"name": "relu", "kind": "relu", "shape": [64, 32, 32], "relus": 65_536,
                            "relus_kept": 65_536, "macs": 0}
    assert sum(r["relus"] for r in rows) == 557_056
    assert sum(r["macs"] for r in rows) == 555_422_720
    fc = [r for r in rows if r["kind"] == "linear"]
    assert fc == [{"name": "fc", "kind": "linear", "shape": [10], "relus": 0, "relus_kept": 0, "macs": 5120}]


def test_shape_analysis_resnet8_and_shapes():
    gm, rec = _analyze(resnet8())
    assert rec.stats["relus"] == 73_728
    shapes = {n.name: meta(n).get("shape") for n in gm.graph.nodes}
    assert shapes["x"] == (3, 32, 32)
    assert shapes["fc"] == (10,)
    assert shapes["flatten"] == (64,)
    conv1 = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert meta(conv1)["macs"] == 16 * 32 * 32 * 3 * 9 and meta(conv1)["kind"] == "conv"


def test_shape_analysis_counts_maxpool_comparisons():
    class Pooled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(4, 6, 3, padding=1, groups=2)

        def forward(self, x):
            x = self.pool(torch.relu(self.conv(x)))          # 4x4x4 out, 3 comparisons each
            x = F.max_pool2d(self.conv2(x), 2)               # 6x2x2 out, 3 each
            return x

    gm, rec = _analyze(Pooled(), size=8)
    assert rec.stats["maxpool_comparisons"] == 4 * 4 * 4 * 3 + 6 * 2 * 2 * 3
    assert rec.stats["relus"] == 4 * 8 * 8
    pool = next(n for n in gm.graph.nodes if n.target == "pool")
    assert meta(pool)["kind"] == "maxpool" and meta(pool)["maxpool_comparisons"] == 192
    conv2 = next(n for n in gm.graph.nodes if n.target == "conv2")
    assert meta(conv2)["macs"] == 6 * 4 * 4 * (4 // 2) * 9  # groups divide the input channels
    rows = layer_table(gm)
    assert sum(r.get("maxpool_comparisons", 0) for r in rows) == 192 + 72


def test_shape_analysis_is_idempotent_and_restores_training_flag():
    gm = trace(tinycnn())
    CanonicalizeReLUPass()(gm)
    gm.train()
    x = torch.randn(1, 3, 32, 32)
    s1 = ShapeAnalysisPass(x)(gm).stats
    assert gm.training
    s2 = ShapeAnalysisPass(x)(gm).stats
    assert s1 == s2 == {"relus": 20_480, "relus_kept": 20_480, "macs": s1["macs"], "maxpool_comparisons": 0,
                        "hidden_relus": 0, "comparisons": 0, "nonlinearities": {}}

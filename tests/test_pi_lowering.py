"""PI-ready lowering (passes/pi_lowering.py): every form equals the mask form, and the ONNX graph's
ReLU count (counted from the graph) equals the mask's kept count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from relucomp.api import build_gated, lowering_passes
from relucomp.export import export_onnx
from relucomp.infra import PassManager
from relucomp.nn import SparseReLU
from relucomp.passes.dce import DeadCodeEliminationPass
from relucomp.passes.fold_bn import FoldBatchNormPass
from relucomp.passes.insert_gates import gates_of
from relucomp.passes.lower_gates import LowerGatesPass
from relucomp.passes.maxpool_to_avgpool import MaxPoolToAvgPoolPass
from relucomp.passes.pi_lowering import (FORMS, CompactReLU, PILoweringPass, PrefixReLU, RunsReLU, best_block,
                                         compact_nodes, compaction_stages, form_costs, lowering_coefficients)
from relucomp.passes.shape_prop import ShapeAnalysisPass
from relucomp.verify import onnx_relu_count


class Net(nn.Module):
    """Conv activations (residual and plain), a linear activation."""

    def __init__(self, c: int = 6, hw: int = 6):
        super().__init__()
        self.conv0 = nn.Conv2d(3, c, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(4 * c, 12)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x0 = self.relu0(self.conv0(x))
        h = self.relu1(self.bn1(self.conv1(x0)))  # producer conv+BN, consumer conv only: channel_perm applies
        y = self.relu2(self.conv2(h) + x0)
        return self.fc2(self.relu3(self.fc1(torch.flatten(self.pool(y), 1))))


def _gated(granularity: str, seed: int, c: int = 6, hw: int = 6, p: float = 0.4):
    torch.manual_seed(seed)
    model = Net(c, hw).eval()
    with torch.no_grad():  # non-trivial BN statistics
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, hw, hw)
    gm, _ = build_gated(model, x, granularity=granularity)
    g = torch.Generator().manual_seed(seed)
    kept = 0
    for gate in gates_of(gm).values():
        m = (torch.rand(gate.mask.shape, generator=g) < p).float()
        flat = m.view(-1)
        if flat.numel() > 1:  # keep every layer partial: at least one kept and one linear entry
            flat[0], flat[-1] = 1.0, 0.0
        gate.set_mask(m)
        kept += int(m.sum()) * gate.elements_per_gate
    return gm.eval(), x, kept


def _sparse_layers(gm) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, SparseReLU)]


@pytest.mark.parametrize("granularity", ["pixel", "channel", "layer"])
@pytest.mark.parametrize("forms", [FORMS, ("gather",), ("runs",), ("compact", "gather"), ("channel_perm", "runs")])
def test_forms_equal_mask_form(granularity, forms):
    for seed, (c, hw) in enumerate([(6, 6), (4, 5), (8, 4)]):
        gm, x, kept = _gated(granularity, seed, c, hw)
        with torch.no_grad():
            ref = gm(x)
        pm = PassManager([LowerGatesPass(), FoldBatchNormPass(), PILoweringPass(forms=forms), DeadCodeEliminationPass(),
                          ShapeAnalysisPass(x[:1])], calibration=x)
        low = pm.run(gm).gm
        with torch.no_grad():
            got = low(x)
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5), (granularity, forms, seed)
        assert sum(m.kept_relus for m in _sparse_layers(low)) + sum(
            math.prod(n.meta["relucomp"]["shape"]) for n in low.graph.nodes if n.op == "call_function"
            and n.target is torch.relu) == kept
        used = {type(m).form if hasattr(type(m), "form") else "gather" for m in _sparse_layers(low)}
        assert used <= set(forms) | {"gather"} if "gather" in forms else used <= set(forms)


def test_channel_perm_folds_into_convs():
    gm, x, kept = _gated("channel", 3)
    with torch.no_grad():
        ref = gm(x)
    pm = PassManager([LowerGatesPass(), FoldBatchNormPass(), PILoweringPass(forms=("channel_perm", "runs"))],
                     calibration=x)
    low = pm.run(gm).gm
    prefix = [m for m in low.modules() if isinstance(m, PrefixReLU)]
    assert len(prefix) == 1  # relu1: conv1(+BN) → relu1 → conv2 only
    assert torch.allclose(low(x), ref, atol=1e-5)
    stats = pm.records[2].stats
    assert stats["forms"].get("channel_perm") == 1


@pytest.mark.parametrize("forms", [FORMS, ("runs", "pixel_perm")])
def test_pixel_perm_reorders_channels_into_fewer_runs(tmp_path, forms):
    """relu1's pixel mask: alternating fully kept / fully linear channels plus two mixed ones → reordering the
    channels (folded into conv1 and conv2) leaves far fewer runs; exact, and the ONNX ReLU count is the kept count."""
    gm, x, _ = _gated("pixel", 4, c=8, hw=6)
    gates = gates_of(gm)
    g1 = next(g for name, g in gates.items() if "relu1" in name)
    m = torch.zeros(8, 6, 6)
    m[0::2] = 1.0  # channels 0, 2, 4, 6 fully kept
    m[1, :3] = 1.0  # channels 1, 3 mixed
    m[3, 2:] = 1.0
    g1.set_mask(m[None])
    kept = sum(g.kept_relus() for g in gates.values())
    with torch.no_grad():
        ref = gm(x)
    pm = PassManager([LowerGatesPass(), FoldBatchNormPass(), PILoweringPass(forms=forms), DeadCodeEliminationPass(),
                      ShapeAnalysisPass(x[:1])], calibration=x)
    low = pm.run(gm).gm
    rec = next(r for r in pm.records if r.name == "PILoweringPass").stats["layers"]
    r1 = next(r for r in rec if "relu1" in r["site"])
    assert r1["form"] == "perm+runs" and r1["costs_s"]["perm+runs"] < r1["costs_s"]["runs"]
    runs_mod = [mm for mm in low.modules() if isinstance(mm, RunsReLU) and mm.keep.numel() == int(m.sum())]
    assert runs_mod and len(runs_mod[0].runs) < 8  # unpermuted: 11 runs; permuted: 4 kept ch + 2 mixed + 2 linear
    with torch.no_grad():
        assert torch.allclose(low(x), ref, atol=1e-5)
    res = export_onnx(low, tmp_path / "p.onnx", example=x[:1], max_relus=kept)
    assert res["onnx_relus"] == kept


def test_compaction_network_random_masks():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 64, 300, 1024):
        for p in (0.02, 0.3, 0.7, 0.98):
            mask = torch.rand(n, generator=g) < p
            k = int(mask.sum())
            if k in (0, n):
                continue
            comp, exp = compaction_stages(mask)
            v = torch.arange(n, dtype=torch.float32)[None]
            cur = v
            for s, cond in comp:
                cur = torch.where(cond, torch.roll(cur, -s, 1), cur)
            assert torch.equal(cur[0, :k], v[0, mask])  # kept elements in order at the front
            assert len(comp) <= max(1, (n - k).bit_length())
            for s, cond in exp:
                cur = torch.where(cond, torch.roll(cur, s, 1), cur)
            assert torch.equal(cur[0, mask], v[0, mask])
            keep = torch.nonzero(mask).flatten()
            for shape in ((n,), (1, n)):
                x = torch.randn(3, *shape)
                ref = torch.where(mask.reshape(shape), torch.relu(x), x)
                for block in {n} | {b for b in (8, 16, 64) if n % b == 0}:
                    assert torch.equal(CompactReLU(keep, shape, block=block)(x), ref)
                assert torch.equal(RunsReLU(keep, shape)(x), ref)


def test_costs_choose_cheapest():
    c = lowering_coefficients()
    mask = torch.zeros(16 * 32 * 32, dtype=torch.bool)
    mask[:4096] = True  # whole channels: 2 runs
    costs = form_costs(mask, (16, 32, 32), False, c)
    assert min(costs, key=costs.get) == "runs"
    mask = torch.rand(16 * 32 * 32, generator=torch.Generator().manual_seed(1)) < 0.3
    costs = form_costs(mask, (16, 32, 32), False, c)
    assert set(costs) == {"gather", "runs", "compact"} and min(costs, key=costs.get) in ("gather", "compact")
    assert costs["runs"] > costs["gather"]  # thousands of runs: the per-op overhead dominates
    assert 16 * 32 * 32 // best_block(mask, c)[0] <= 64
    ch = torch.tensor([True, False] * 8)
    assert "channel_perm" in form_costs(ch, (16, 4, 4), True, c, perm_ok=True)
    slow_gather = {"gather_element_s": 1e-3, "select_element_s": 1e-9, "copy_element_s": 0.0, "op_s": 1e-4}
    costs = form_costs(mask, (16, 32, 32), False, slow_gather)
    assert min(costs, key=costs.get) == "compact"


@pytest.mark.parametrize("shape,block", [((16, 32, 32), 1024), ((64, 8, 8), 512), ((4, 4, 4), 64)])
def test_compact_cost_counts_every_exported_node(tmp_path, shape, block):
    """op_s is fitted per node of the raw TorchScript export (bench_pi.py), constants included: the compact
    form's cost must count its nodes the same way."""
    import collections

    import onnx

    n = math.prod(shape)
    keep = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3).nonzero().flatten()
    mod = CompactReLU(keep, shape, block=block).eval()
    torch.onnx.export(mod, (torch.randn(1, *shape),), str(tmp_path / "c.onnx"), dynamo=False, opset_version=18)
    ops = collections.Counter(nd.op_type for nd in onnx.load(str(tmp_path / "c.onnx")).graph.node)
    assert sum(ops.values()) == compact_nodes(mod.stages, n // block), dict(ops)


def test_shipped_coefficients_rank_forms_as_measured():
    """pi.json measured all-gather pixel-18432 faster than all-compact under SPU (public and private weights):
    with the shipped coefficients the lowering must not pick compact for such masks."""
    c = lowering_coefficients()
    g = torch.Generator().manual_seed(0)
    for shape in ((16, 32, 32), (32, 16, 16), (64, 8, 8)):
        costs = form_costs(torch.rand(shape, generator=g) < 0.25, shape, False, c)
        assert min(costs, key=costs.get) == "gather", (shape, costs)


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_onnx_relu_count_equals_budget(tmp_path, granularity):
    gm, x, kept = _gated(granularity, 7)
    with torch.no_grad():
        ref = gm(x)
    low = PassManager(lowering_passes(x, gate_form="pi"), calibration=x).run(gm).gm
    assert torch.allclose(low(x), ref, atol=1e-5)
    res = export_onnx(low, tmp_path / "m.onnx", example=x[:1], max_relus=kept)  # also checks onnxruntime == torch
    assert res["onnx_relus"] == kept
    assert onnx_relu_count(str(tmp_path / "m.onnx"))["relus"] == kept


def test_maxpool_to_avgpool():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.relu = nn.ReLU()
            self.pool = nn.MaxPool2d(2)

        def forward(self, x):
            return torch.nn.functional.max_pool2d(self.pool(self.relu(self.conv(x))), 3, 1, 1).flatten(1)

    from relucomp.api import analyze

    x = torch.randn(2, 3, 8, 8)
    gm = analyze(M(), x)
    assert sum(n.meta["relucomp"].get("maxpool_comparisons", 0) for n in gm.graph.nodes) == 4 * 4 * 4 * 3 + 4 * 4 * 4 * 8
    res = PassManager([MaxPoolToAvgPoolPass(), ShapeAnalysisPass(x[:1])], calibration=x).run(gm)
    assert res.stats["passes"][0]["stats"]["replaced"] and len(res.stats["passes"][0]["stats"]["replaced"]) == 2
    out = res.gm
    assert sum(n.meta["relucomp"].get("maxpool_comparisons", 0) for n in out.graph.nodes) == 0
    assert not any(isinstance(m, nn.MaxPool2d) for m in out.modules())
    h = torch.relu(gm.conv(x))
    want = torch.nn.functional.avg_pool2d(torch.nn.functional.avg_pool2d(h, 2), 3, 1, 1, count_include_pad=False)
    assert torch.allclose(out(x), want.flatten(1), atol=1e-6)
    assert not MaxPoolToAvgPoolPass().call(out).modified  # idempotent

"""Channel pruning (analysis / mechanism / policy) and gradual magnitude pruning."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from relucomp.api import analyze, build_gated, inspect_onnx, lowering_passes
from relucomp.errors import BudgetError, RelucompError
from relucomp.export import export_onnx
from relucomp.infra import PassManager
from relucomp.models.cifar import BasicBlock, resnet20
from relucomp.nn import ReLUGate
from relucomp.passes.gmp import GMP, MagnitudePrunePass, cubic_sparsity, prunable_weights
from relucomp.passes.insert_gates import gates_of
from relucomp.passes.prune_analysis import ChannelDependencyPass, analyze_channels
from relucomp.passes.prune_channels import ChannelPrunePass, plan_from_units
from relucomp.pruning import model_costs, prune, unit_importance

SIZE = 16


# --------------------------------------------------------------------------- topologies

def _cbr(i, o, **kw):
    return [nn.Conv2d(i, o, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(o), nn.ReLU()]


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(*_cbr(3, 8), *_cbr(8, 12, stride=2), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.f(x), 1))


class Projection(nn.Module):
    """Residual block with a 1x1-conv + BN projection shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, 8))
        self.block = BasicBlock(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block(self.stem(x))), 1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*_cbr(3, 6))
        self.b = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5), nn.ReLU())
        self.c = nn.Sequential(*_cbr(11, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.c(y).mean((2, 3)))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(*_cbr(3, 8), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True), nn.BatchNorm2d(8),
                               nn.ReLU(), *_cbr(8, 10), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        return self.fc(self.f(x))


class FlatHead(nn.Module):
    """flatten of C×H×W into a linear (slices H·W feature blocks), hidden linear + ReLU."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1, bias=True), nn.BatchNorm2d(6), nn.ReLU())
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(torch.flatten(self.f(x), 1))))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


def _x(n=4, size=SIZE, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _zero_units(gm, graph, units):
    """Make the channels of ``units`` identically zero (producer rows, biases, BN γ/β)."""
    units = set(units)
    for site in graph.sites:
        if site.role == "gate":
            continue
        pos = [i for i, u in enumerate(site.out_units.tolist()) if u in units]
        if not pos:
            continue
        mod = gm.get_submodule(site.target)
        mod.weight[pos] = 0
        if getattr(mod, "bias", None) is not None:
            mod.bias[pos] = 0


def _pick(graph, frac=0.5, seed=0):
    """About ``frac`` of the prunable units, never a whole space."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(graph.prunable_units()).tolist()
    kept = {s.index: s.size for s in graph.spaces}
    out = []
    for u in order:
        m = graph.space_members(u)
        if len(out) < frac * len(order) and all(kept[s] - c >= 1 for s, c in m.items()):
            for s, c in m.items():
                kept[s] -= c
            out.append(u)
    return out


def _exact_prune(gm, x, *, export_dir=None, lower=False):
    """Zero some units, prune them with the l1 policy, check: exactness, shapes, idempotence, ONNX."""
    graph = analyze_channels(gm)
    chosen = _pick(graph)
    assert chosen, "nothing prunable"
    _zero_units(gm, graph, chosen)
    ref = gm(x)
    before = model_costs(gm)
    n = len(graph.prunable_units())
    stats = prune(gm, channel_ratio=len(chosen) / n, importance="l1")
    assert stats["pruned_units"] == len(chosen)
    # the zeroed channels were exactly the lowest-ranked: the function is unchanged
    out = gm(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    after = model_costs(gm)
    assert after["params"] < before["params"] and after["macs"] < before["macs"]
    assert after["relus_kept"] <= before["relus_kept"]
    assert stats["macs"]["after"] == after["macs"]
    # the same plan again is a no-op
    res = ChannelPrunePass(stats["plan"])(gm)
    assert not res.modified and res.stats["already_pruned"] > 0
    torch.testing.assert_close(gm(x), ref, atol=1e-5, rtol=1e-5)
    if export_dir is not None:
        target = gm
        if lower:
            target = PassManager(lowering_passes(x), calibration=x).run(copy.deepcopy(gm)).gm
        info = export_onnx(target, export_dir / "m.onnx", example=x[:1], verify_batch=x[:3])
        onnx_total = inspect_onnx(export_dir / "m.onnx")["total"]
        assert onnx_total["macs"] <= after["macs"] < before["macs"]
        assert info["onnx_relus"] <= after["relus_kept"]
    return stats, before, after


# --------------------------------------------------------------------------- analysis

def test_resnet_stage_is_one_group():
    gm = analyze(_randomize(resnet20(width=0.25)), _x(2))
    p = ChannelDependencyPass()
    res = PassManager([p]).run(gm)
    assert not res.modified
    s = res.stats["passes"][0]["stats"]
    members = s["group_members"]
    # stage 1 (identity shortcuts): stem conv + every block's conv2 share 4 coupled channels
    assert members["conv1"] == ["conv1", "layers.0.0.conv2", "layers.0.1.conv2", "layers.0.2.conv2"]
    assert s["group_sizes"]["conv1"] == 4
    # stage 2 starts with a projection shortcut: it joins the stage's group
    g2 = members["layers.1.0.conv2"]
    assert "layers.1.0.shortcut.0" in g2 and "layers.1.2.conv2" in g2
    assert s["pinned"] == {"model input": 3, "model output": 10}
    n = next(n for n in gm.graph.nodes if n.target == "layers.0.1.conv2")
    assert n.meta["relucomp"]["channel_space"] == "layers.0.1.conv2"
    assert n.meta["relucomp"]["prune_role"] == "conv"
    assert len(n.meta["relucomp"]["channel_units"]) == 4


def test_cost_model_matches_shape_analysis():
    gm = analyze(_randomize(resnet20(width=0.25)), _x(2))
    graph = analyze_channels(gm)
    c = graph.cost()
    m = model_costs(gm)
    assert c["macs"] == m["macs"] and c["relus"] == m["relus"]
    chosen = _pick(graph, 0.3)
    predicted = graph.cost(chosen)
    ChannelPrunePass(plan_from_units(gm, graph, chosen))(gm)
    m = model_costs(gm)
    assert predicted == {"macs": m["macs"], "relus": m["relus"]}


# --------------------------------------------------------------------------- topologies: exactness + ONNX

@pytest.mark.parametrize("factory", [Chain, Projection, Concat, Depthwise, FlatHead], ids=lambda f: f.__name__)
def test_topology_exact_prune_and_export(factory, tmp_path):
    torch.manual_seed(0)
    x = _x()
    gm = analyze(_randomize(factory()), x)
    _exact_prune(gm, x, export_dir=tmp_path)


def test_identity_residual_group_across_blocks(tmp_path):
    torch.manual_seed(0)
    x = _x(4)
    gm = analyze(_randomize(resnet20(width=0.5)), x)
    stats, before, after = _exact_prune(gm, x, export_dir=tmp_path)
    # every module of a coupled group shrank together
    widths = {gm.get_submodule(k).out_channels for k in ("conv1", "layers.0.0.conv2", "layers.0.1.conv2", "layers.0.2.conv2")}
    assert len(widths) == 1 and widths.pop() < 8
    assert gm.get_submodule("layers.0.1.bn2").num_features == gm.get_submodule("conv1").out_channels


def test_flatten_head_slices_hw_blocks():
    x = _x()
    gm = analyze(_randomize(FlatHead()), x)
    graph = analyze_channels(gm)
    conv_space = graph.space("f.0")
    unit = graph.unit_of(conv_space.index, 2)
    ChannelPrunePass(plan_from_units(gm, graph, [unit]))(gm)
    assert gm.get_submodule("f.0").out_channels == 5 and gm.fc1.in_features == 5 * 16


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_gates_are_sliced_with_their_channels(granularity, tmp_path):
    torch.manual_seed(0)
    x = _x()
    gm, _ = build_gated(_randomize(Projection()), x, granularity=granularity)
    g = torch.Generator().manual_seed(3)
    for gate in gates_of(gm).values():
        gate.set_mask((torch.rand(gate.mask.shape, generator=g) > 0.4).float())
    gm.eval()
    kept_before = sum(gt.kept_relus() for gt in gates_of(gm).values())
    stats, before, after = _exact_prune(gm, x, export_dir=tmp_path, lower=True)
    for name, gate in gates_of(gm).items():
        assert isinstance(gate, ReLUGate) and bool(gate.hard)
        assert gate.alpha.shape[1] == gate.act_shape[0] and gate.mask.shape == gate.alpha.shape
    kept_after = sum(gt.kept_relus() for gt in gates_of(gm).values())
    assert kept_after < kept_before and stats["relus"]["after"] == kept_after


def test_sparse_relu_is_refused():
    x = _x()
    gm, _ = build_gated(_randomize(Chain()), x, granularity="pixel")
    for gate in gates_of(gm).values():
        m = torch.ones_like(gate.mask)
        m.view(-1)[::2] = 0
        gate.set_mask(m)
    gm = PassManager(lowering_passes(x), calibration=x).run(gm).gm
    with pytest.raises(RelucompError, match="SparseReLU"):
        analyze_channels(gm)


# --------------------------------------------------------------------------- protection / errors

def test_whole_group_and_pinned_channels_are_protected():
    x = _x()
    gm = analyze(_randomize(Chain()), x)
    graph = analyze_channels(gm)
    with pytest.raises(RelucompError, match="keep at least one"):
        ChannelPrunePass({"f.0": list(range(8))})(gm)
    with pytest.raises(RelucompError, match="model output"):
        ChannelPrunePass({"fc": [0]})(gm)
    assert gm.get_submodule("f.0").out_channels == 8  # nothing changed
    stats = prune(gm, channel_ratio=0.99)
    assert gm.get_submodule("f.0").out_channels >= 1 and gm.get_submodule("f.3").out_channels >= 1 and gm.fc.out_features == 5
    assert stats["pruned_units"] == len(graph.prunable_units()) - 2
    assert gm(x).shape == (4, 5)
    with pytest.raises(RelucompError):
        prune(gm, channel_ratio=1.0)
    with pytest.raises(RelucompError, match="exactly one"):
        prune(gm, channel_ratio=0.5, mac_budget="1M")


def test_mac_budget_global_and_uniform():
    x = _x(2)
    base = analyze(_randomize(resnet20(width=0.25)), x)
    total = model_costs(base)["macs"]
    for scope in ("global", "uniform"):
        gm = copy.deepcopy(base)
        stats = prune(gm, mac_budget=str(total // 2), scope=scope)
        assert stats["macs"]["after"] <= total // 2 < stats["macs"]["before"]
        assert model_costs(gm)["macs"] == stats["macs"]["after"]
        assert stats["relus"]["after"] < stats["relus"]["before"]
        assert gm(x).shape == (2, 10)
    with pytest.raises(BudgetError, match="MAC budget"):
        prune(copy.deepcopy(base), mac_budget="1k")
    gm = copy.deepcopy(base)
    assert prune(gm, mac_budget=total + 1)["pruned_units"] == 0


def test_importances():
    x = _x(8)
    gm = analyze(_randomize(Projection()), x)
    graph = analyze_channels(gm)
    y = torch.randint(0, 5, (8,))
    for imp in ("l1", "l2", "bn", "taylor"):
        s = unit_importance(gm, graph, imp, calib=(x, y))
        pr = graph.prunable_units()
        assert np.all(np.isfinite(s[pr])) and np.all(s[pr] >= 0)
        assert np.all(np.isinf(np.delete(s, pr)))
    chosen = _pick(graph, 0.3)
    _zero_units(gm, graph, chosen)
    for imp in ("l1", "taylor"):
        s = unit_importance(gm, graph, imp, calib=(x, y))
        assert np.allclose(s[chosen], 0.0)
    with pytest.raises(RelucompError, match="importance"):
        prune(gm, channel_ratio=0.3, importance="nope")


# --------------------------------------------------------------------------- GMP

def test_cubic_schedule_values():
    kw = dict(final=0.9, begin=10, end=110, frequency=10)
    assert cubic_sparsity(0, **kw) == 0.0
    assert cubic_sparsity(10, **kw) == pytest.approx(0.0)
    assert cubic_sparsity(60, **kw) == pytest.approx(0.9 * (1 - 0.5 ** 3))
    assert cubic_sparsity(65, **kw) == cubic_sparsity(60, **kw)  # updated every `frequency` steps
    assert cubic_sparsity(110, **kw) == pytest.approx(0.9) and cubic_sparsity(500, **kw) == pytest.approx(0.9)
    assert cubic_sparsity(10, initial=0.5, final=0.9, begin=10, end=110) == pytest.approx(0.5)
    vals = [cubic_sparsity(t, **kw) for t in range(0, 130)]
    assert all(a <= b for a, b in zip(vals, vals[1:]))


def test_gmp_finetune_reaches_sparsity_and_bakes():
    from relucomp.passes.finetune import FinetunePass

    torch.manual_seed(0)
    x = _x(32)
    gm = analyze(_randomize(Chain()), x)
    loader = [(x[i:i + 8], torch.randint(0, 5, (8,))) for i in range(0, 32, 8)]
    gmp = GMP(gm, sparsity=0.8, end_step=6, frequency=2)
    seen = []

    def after(step):
        gmp(step)
        w = gm.get_submodule("f.3").weight
        seen.append((step, float((w == 0).float().mean())))

    FinetunePass(train_loader=loader, epochs=2, lr=0.05, after_step=after)(gm)
    # masks re-applied after every step: sparsity never goes down, 0.8 from step 6 on
    assert [s for _, s in seen] == sorted(s for _, s in seen)
    assert seen[-1][1] == pytest.approx(0.8, abs=0.01)
    stats = gmp.bake()
    assert stats["achieved"] == pytest.approx(0.8, abs=0.01)
    for name, w in prunable_weights(gm).items():
        assert type(w) is nn.Parameter
        assert float((w == 0).float().mean()) == pytest.approx(0.8, abs=0.02)
    assert gm(x).shape == (32, 5)


def test_one_shot_magnitude_pass_is_honest():
    gm = analyze(_randomize(Chain()), _x())
    assert MagnitudePrunePass(0.5)(gm).modified
    assert not MagnitudePrunePass(0.5)(gm).modified
    with pytest.raises(RelucompError):
        GMP(gm, sparsity=1.5, end_step=10)


# --------------------------------------------------------------------------- compile integration

def test_compile_hook_and_plan_replay():
    """What relucomp.compile does at its pruning hook, and what load_compiled replays."""
    from relucomp.pruning import compile_hook, pruning_plan_of
    from relucomp.passes.prune_channels import apply_plan

    torch.manual_seed(0)
    x = _x()
    model = _randomize(Projection())
    gm, _ = build_gated(model, x, granularity="channel")
    for gate in gates_of(gm).values():
        gate.set_mask((torch.rand(gate.mask.shape) > 0.3).float())
    kept = sum(g.kept_relus() for g in gates_of(gm).values())
    report, gmp = compile_hook(gm, mac_budget="60%", sparsity=0.5, finetune_steps=0, relu_budget=kept)
    assert gmp is None and report["sparsity"]["achieved"] == pytest.approx(0.5, abs=0.01)
    ch = report["channels"]
    assert ch["macs"]["after"] <= 0.6 * ch["macs"]["before"]
    assert report["relus_kept"]["after"] <= report["relus_kept"]["before"] <= kept
    assert {r["name"] for r in ch["per_layer"]} >= {"stem.0", "block.conv1", "fc"}
    # replay: a fresh gated graph + the plan takes the pruned state dict
    fresh, _ = build_gated(model, x, granularity="channel")
    for gate in gates_of(fresh).values():
        gate.hard.fill_(True)
    apply_plan(fresh, pruning_plan_of(report))
    fresh.load_state_dict(gm.state_dict())
    torch.testing.assert_close(fresh.eval()(x), gm.eval()(x))
    with pytest.raises(RelucompError, match="sparsity"):
        compile_hook(gm, sparsity=1.0)


def test_pruning_a_deep_copy_leaves_the_original_intact():
    x = _x()
    gm = analyze(_randomize(Chain()), x)
    before = model_costs(gm)
    ref = gm(x)
    pruned = copy.deepcopy(gm)
    prune(pruned, channel_ratio=0.5)
    assert model_costs(gm) == before  # metadata not shared with the pruned copy
    torch.testing.assert_close(gm(x), ref)
    assert model_costs(pruned)["macs"] < before["macs"]


def test_round_to_keeps_widths_aligned():
    x = _x(2)
    gm = analyze(_randomize(resnet20(width=0.5)), x)
    stats = prune(gm, channel_ratio=0.4, round_to=4)
    widths = [r["shape_after"][0] for r in stats["per_layer"] if r["kind"] == "conv"]
    assert all(w % 4 == 0 for w in widths) and min(widths) >= 4
    assert stats["macs"]["after"] < stats["macs"]["before"]
    gm = analyze(_randomize(resnet20(width=0.5)), x)
    total = model_costs(gm)["macs"]
    stats = prune(gm, mac_budget=total // 2, round_to=4)
    assert stats["macs"]["after"] <= total // 2
    assert all(r["shape_after"][0] % 4 == 0 for r in stats["per_layer"] if r["kind"] == "conv")


class Sliced(nn.Module):
    """An op the analysis does not model (channel slicing) pins what it touches; the rest still prunes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(*_cbr(3, 8))
        self.b = nn.Sequential(*_cbr(4, 6), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.b(self.a(x)[:, :4] * 2.0))


def test_unsupported_ops_pin_their_channels(tmp_path):
    x = _x()
    gm = analyze(_randomize(Sliced()), x)
    graph = analyze_channels(gm)
    # the 8 channels read by x[:, :4] and the 4 it produces
    assert graph.summary()["pinned"].get("unsupported op call_function:getitem") == 12
    a0 = graph.space("a.0")
    assert all(graph.units[graph.unit_of(a0.index, p)].pinned for p in range(a0.size))
    assert graph.summary()["group_sizes"] == {"b.0": 6}
    _exact_prune(gm, x, export_dir=tmp_path)
    assert gm.get_submodule("a.0").out_channels == 8


def test_cli_compile_has_pruning_options():
    from typer.testing import CliRunner

    from relucomp.cli import app

    res = CliRunner().invoke(app, ["compile", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--prune-channels", "--mac-budget", "--sparsity", "--prune-importance"):
        assert opt in res.output


def test_compile_options_fail_fast():
    from relucomp.pruning import check_options

    gm = analyze(_randomize(Chain()), _x())
    total = model_costs(gm)["macs"]
    assert check_options(gm) is None
    assert check_options(gm, mac_budget="50%") == total // 2
    with pytest.raises(BudgetError, match="below"):
        check_options(gm, mac_budget="10")
    with pytest.raises(RelucompError, match="not both"):
        check_options(gm, prune_channels=0.5, mac_budget="1M")
    with pytest.raises(RelucompError, match="sparsity"):
        check_options(gm, sparsity=0.0)
    with pytest.raises(RelucompError, match="importance"):
        check_options(gm, prune_channels=0.3, importance="l3")

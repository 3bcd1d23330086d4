"""ReLUGate / SparseReLU modules, InsertGatesPass and LowerGatesPass."""

from __future__ import annotations


import pytest
import torch

from relucomp.errors import PassError, RelucompError
from relucomp.infra import PassManager
from relucomp.ir import meta, relu_nodes, trace
from relucomp.models import tinycnn
from relucomp.nn import ReLUGate, SparseReLU, gate_shape
from relucomp.passes.canonicalize import CanonicalizeReLUPass
from relucomp.passes.insert_gates import GATES, InsertGatesPass, gates_of
from relucomp.passes.lower_gates import LowerGatesPass
from relucomp.passes.shape_prop import ShapeAnalysisPass

TINY_SHAPES = {"relu1": (8, 32, 32), "relu2": (16, 16, 16), "block.relu1": (16, 16, 16), "block.relu2": (16, 16, 16)}


# --------------------------------------------------------------------------- modules

def test_gate_shape():
    assert gate_shape((8, 4, 4), "pixel") == (1, 8, 4, 4)
    assert gate_shape((8, 4, 4), "channel") == (1, 8, 1, 1)
    assert gate_shape((8, 4, 4), "layer") == (1, 1, 1, 1)
    assert gate_shape((10,), "channel") == (1, 10)
    assert gate_shape((), "channel") == (1,)
    with pytest.raises(ValueError, match="unknown granularity"):
        gate_shape((8,), "neuron")


def test_relu_gate_math():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4)
    g = ReLUGate((3, 4, 4), "pixel", site="s")
    assert torch.equal(g(x), torch.relu(x))  # open: exactly ReLU
    with torch.no_grad():
        g.alpha.zero_()
    assert torch.equal(g(x), x)  # closed: identity
    with torch.no_grad():
        g.alpha.fill_(0.25)
    assert torch.allclose(g(x), x + 0.25 * (torch.relu(x) - x))
    with torch.no_grad():
        g.alpha.fill_(2.7)
    g.clamp_()  # while searching, a is a score kept in [-1, 2]; the forward clips it to [0, 1]
    assert float(g.alpha.detach().max()) == 2.0
    assert torch.equal(g(x), torch.relu(x))

    mask = (torch.rand(1, 3, 4, 4) > 0.5).float()
    g.set_mask(mask)
    assert bool(g.hard) and not g.alpha.requires_grad
    assert torch.equal(g(x), torch.where(mask.bool(), torch.relu(x), x))
    assert g.kept_relus() == int(mask.sum())
    assert g.total_relus == 48 and g.elements_per_gate == 1


def test_relu_gate_counts_per_granularity():
    ch = ReLUGate((4, 3, 3), "channel")
    assert ch.alpha.shape == (1, 4, 1, 1) and ch.elements_per_gate == 9
    ch.set_mask(torch.tensor([1.0, 0, 1, 0]).reshape(1, 4, 1, 1))
    assert ch.kept_relus() == 18
    x = torch.randn(2, 4, 3, 3)
    y = ch(x)
    assert torch.equal(y[:, 0], torch.relu(x[:, 0])) and torch.equal(y[:, 1], x[:, 1])

    layer = ReLUGate((4, 3, 3), "layer")
    assert layer.alpha.numel() == 1 and layer.elements_per_gate == 36
    with torch.no_grad():
        layer.alpha.fill_(0.005)
    assert layer.kept_relus() == 0 and layer.kept_relus(threshold=0.001) == 36


def test_relu_gate_state_dict_restores_hard_mask():
    g = ReLUGate((2, 2), "pixel")
    g.set_mask(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    g2 = ReLUGate((2, 2), "pixel")
    g2.load_state_dict(g.state_dict())
    assert bool(g2.hard) and torch.equal(g2.mask, g.mask)
    x = torch.randn(3, 2, 2)
    assert torch.equal(g2(x), g(x))


@pytest.mark.parametrize("by_channel", [False, True])
def test_sparse_relu_math(by_channel):
    torch.manual_seed(0)
    shape = (4, 3, 3)
    x = torch.randn(6, *shape)
    if by_channel:
        keep = torch.tensor([2, 0])
        sp = SparseReLU(keep, shape, by_channel=True)
        mask = torch.zeros(1, 4, 1, 1)
        mask[0, [0, 2]] = 1
        assert sp.kept_relus == 2 * 9
    else:
        keep = torch.tensor([5, 1, 30, 35])
        sp = SparseReLU(keep, shape)
        mask = torch.zeros(36)
        mask[keep] = 1
        mask = mask.reshape(1, *shape)
        assert sp.kept_relus == 4
    assert torch.equal(sp.keep, keep.sort().values)
    expected = torch.where(mask.bool(), torch.relu(x), x)
    assert torch.equal(sp(x), expected)


# --------------------------------------------------------------------------- InsertGatesPass

@pytest.mark.parametrize("granularity, param_shape", [
    ("pixel", lambda s: (1, *s)),
    ("channel", lambda s: (1, s[0], 1, 1)),
    ("layer", lambda s: (1, 1, 1, 1)),
])
def test_insert_gates(make_gated, granularity, param_shape):
    model = tinycnn().eval()
    gm, x = make_gated(model, granularity)
    gates = gates_of(gm)
    assert list(gates) == list(TINY_SHAPES)
    for site, g in gates.items():
        assert isinstance(g, ReLUGate) and g.site == site and g.granularity == granularity
        assert g.act_shape == TINY_SHAPES[site]
        assert tuple(g.alpha.shape) == param_shape(TINY_SHAPES[site])
        assert g.alpha.requires_grad and float(g.alpha.detach().min()) == 1.0 and not bool(g.hard)
    assert not any(n.op == "call_function" and n.target is torch.relu for n in gm.graph.nodes)
    assert [meta(n)["kind"] for n in relu_nodes(gm)] == ["gate"] * 4
    assert all(n.target.startswith(GATES + ".") for n in relu_nodes(gm))
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))  # open gates: identical outputs
    assert sum(g.total_relus for g in gates.values()) == 20_480
    assert InsertGatesPass(granularity)(gm).modified is False
    assert len(gates_of(gm)) == 4


def test_insert_gates_needs_shapes_and_valid_granularity():
    gm = trace(tinycnn())
    CanonicalizeReLUPass()(gm)
    with pytest.raises(PassError, match="ShapeAnalysisPass"):
        PassManager([InsertGatesPass("pixel")]).run(gm)
    with pytest.raises(RelucompError, match="unknown granularity"):
        InsertGatesPass("neuron")


def test_insert_gates_on_selected_sites_only():
    gm = trace(tinycnn())
    x = torch.randn(1, 3, 32, 32)
    PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x), InsertGatesPass("pixel", sites={"relu2"})]).run(gm)
    assert list(gates_of(gm)) == ["relu2"]
    assert sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.relu) == 3


def test_shape_analysis_reports_gate_counts(make_gated):
    gm, x = make_gated(tinycnn(), "channel")
    g = gates_of(gm)["relu1"]
    g.set_mask(torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 1]).reshape(1, 8, 1, 1))
    stats = ShapeAnalysisPass(x[:1])(gm).stats
    assert stats["relus"] == 20_480
    assert stats["relus_kept"] == 20_480 - 5 * 32 * 32


# --------------------------------------------------------------------------- LowerGatesPass

def _set_masks(gm, masks):
    gates = gates_of(gm)
    for site, m in masks.items():
        g = gates[site]
        g.set_mask(m(g) if callable(m) else m)


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_lower_gates_sparse(make_gated, granularity):
    gm, x = make_gated(tinycnn(), granularity)
    gen = torch.Generator().manual_seed(3)
    _set_masks(gm, {
        "relu1": lambda g: torch.zeros_like(g.mask),
        "relu2": lambda g: torch.ones_like(g.mask),
        "block.relu1": lambda g: (torch.rand(g.mask.shape, generator=gen) > 0.5).float(),
        "block.relu2": lambda g: (torch.rand(g.mask.shape, generator=gen) > 0.7).float(),
    })
    gates = gates_of(gm)
    expected_kept = {s: int(g.mask.sum()) * g.elements_per_gate for s, g in gates.items()}
    assert 0 < expected_kept["block.relu1"] < 4096 and 0 < expected_kept["block.relu2"] < 4096
    with torch.no_grad():
        ref = gm(x)
    n_nodes = len(gm.graph.nodes)
    pm = PassManager([LowerGatesPass("sparse")], calibration=x)
    gm = pm.run(gm).gm
    assert pm.records[0].stats == {"removed": 1, "to_relu": 1, "to_sparse": 2}
    assert len(gm.graph.nodes) == n_nodes - 1
    assert not any(isinstance(m, ReLUGate) for m in gm.modules())
    kinds = [(meta(n).get("site"), type(gm.get_submodule(n.target)).__name__ if n.op == "call_module" else "relu")
             for n in relu_nodes(gm)]
    assert kinds == [("relu2", "relu"), ("block.relu1", "SparseReLU"), ("block.relu2", "SparseReLU")]
    sparse = {meta(n)["site"]: gm.get_submodule(n.target) for n in relu_nodes(gm) if n.op == "call_module"}
    for site, sp in sparse.items():
        assert sp.kept_relus == expected_kept[site]
        assert sp.by_channel == (granularity == "channel")
    with torch.no_grad():
        assert torch.allclose(gm(x), ref, atol=1e-6)
    stats = ShapeAnalysisPass(x[:1])(gm).stats
    assert stats["relus_kept"] == sum(expected_kept.values())
    assert LowerGatesPass()(gm).modified is False


def test_lower_gates_mask_form_keeps_partial_gates(make_gated):
    gm, x = make_gated(tinycnn(), "pixel")
    _set_masks(gm, {
        "relu1": lambda g: torch.zeros_like(g.mask),
        "relu2": lambda g: torch.ones_like(g.mask),
        "block.relu1": lambda g: (torch.arange(g.mask.numel()).reshape(g.mask.shape) % 3 == 0).float(),
        "block.relu2": lambda g: torch.ones_like(g.mask),
    })
    with torch.no_grad():
        ref = gm(x)
    r = LowerGatesPass("mask")(gm)
    assert r.stats == {"removed": 1, "to_relu": 2, "to_sparse": 0}
    assert list(gates_of(gm)) == ["block.relu1"]
    with torch.no_grad():
        assert torch.equal(gm(x), ref)
    assert LowerGatesPass("mask")(gm).modified is False  # a partial gate in mask form stays
    with pytest.raises(ValueError):
        LowerGatesPass("dense")


def test_lower_gates_leaves_soft_gates_alone(make_gated):
    gm, x = make_gated(tinycnn(), "layer")
    with torch.no_grad():
        gates_of(gm)["relu1"].alpha.fill_(0.5)
    r = LowerGatesPass()(gm)
    assert r.modified is False and len(gates_of(gm)) == 4
    gates_of(gm)["relu2"].set_mask(torch.zeros(1, 1, 1, 1))
    gates_of(gm)["block.relu1"].set_mask(torch.ones(1, 1, 1, 1))
    r = LowerGatesPass()(gm)
    assert r.stats == {"removed": 1, "to_relu": 1, "to_sparse": 0}
    assert list(gates_of(gm)) == ["relu1", "block.relu2"]

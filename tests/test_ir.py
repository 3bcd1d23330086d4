"""relucomp.ir: tracing, ReLU recognition, node helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from relucomp.errors import TraceError
from relucomp.ir import (
    add_module,
    is_canonical_relu,
    is_raw_relu,
    meta,
    node_order,
    relu_kind,
    relu_nodes,
    replace_all_uses_after,
    trace,
    unique_attr_name,
)
from relucomp.models import tinycnn
from relucomp.nn import ReLUGate, SparseReLU


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return x


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            return self.relu(self.conv(x))
        return self.conv(x)


class WithBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.block(x))


def test_trace_returns_graphmodule_of_a_copy():
    model = tinycnn().eval()
    gm = trace(model)
    assert isinstance(gm, fx.GraphModule)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(gm(x), model(x))
    with torch.no_grad():
        gm.conv1.weight.zero_()
    assert model.conv1.weight.abs().sum() > 0  # the user's model is untouched
    gm2 = trace(gm)  # a GraphModule is deep-copied
    assert gm2 is not gm and gm2.conv1 is not gm.conv1
    assert len(relu_nodes(gm)) == 4


def test_trace_error_names_line_and_suggests_fix():
    with pytest.raises(TraceError) as ei:
        trace(Untraceable())
    err = ei.value
    assert "Untraceable" in err.cause
    assert "test_ir.py" in err.cause and "if x.sum() > 0" in err.cause
    assert "leaf" in err.fix
    assert err.__cause__ is not None


def test_leaf_modules_make_untraceable_block_traceable():
    with pytest.raises(TraceError):
        trace(WithBlock())
    gm = trace(WithBlock(), leaf_modules=[Block])
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert mods == ["block", "relu"]
    assert len(relu_nodes(gm)) == 1  # the ReLU inside the leaf is not visible


def test_relu_recognition():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = nn.ReLU()
            self.g = ReLUGate((3,), "pixel")
            self.s = SparseReLU(torch.tensor([0]), (3,))

        def forward(self, x):
            a = self.r(x)
            b = F.relu(a)
            c = torch.relu(b)
            d = c.relu()
            e = self.g(d)
            f = self.s(e)
            return torch.sigmoid(f)

    gm = trace(M())
    kinds = {n.name: relu_kind(gm, n) for n in gm.graph.nodes}
    assert [relu_kind(gm, n) for n in relu_nodes(gm)] == ["relu", "relu", "relu", "relu", "gate", "sparse_relu"]
    assert kinds["sigmoid"] is None and kinds["x"] is None
    canon = [n for n in gm.graph.nodes if is_canonical_relu(n)]
    assert len(canon) == 1 and canon[0].target is torch.relu
    raw = [n for n in gm.graph.nodes if is_raw_relu(gm, n)]
    assert len(raw) == 4  # module, F.relu, torch.relu, method
    # gate and sparse modules are leaves
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"r", "g", "s"}


def test_meta_and_node_helpers():
    gm = trace(tinycnn())
    n = next(iter(gm.graph.nodes))
    assert meta(n) == {} and meta(n) is n.meta["relucomp"]
    meta(n)["x"] = 1
    assert n.meta["relucomp"] == {"x": 1}
    order = node_order(gm)
    assert sorted(order.values()) == list(range(len(gm.graph.nodes)))

    assert unique_attr_name(gm, "conv1") == "conv1_1"
    assert unique_attr_name(gm, "a.b#1") == "a_b_1"
    assert unique_attr_name(gm, "###") == "m"
    name = add_module(gm, "conv1", nn.Identity())
    assert name == "conv1_1" and isinstance(gm.conv1_1, nn.Identity)


def test_replace_all_uses_after():
    def f(x):
        a = x + 1
        b = a * 2
        c = a - 3
        return b + c

    gm = fx.symbolic_trace(f)
    nodes = {n.name: n for n in gm.graph.nodes}
    a, b, c = nodes["add"], nodes["mul"], nodes["sub"]
    with gm.graph.inserting_after(b):
        new = gm.graph.call_function(torch.neg, (a,))
    order = node_order(gm)
    replace_all_uses_after(a, new, new, order)
    assert b.args[0] is a  # before `new`: unchanged
    assert c.args[0] is new
    assert new.args[0] is a
    gm.recompile()
    x = torch.tensor([1.0])
    assert torch.allclose(gm(x), (x + 1) * 2 + (-(x + 1) - 3))


def test_trace_error_line_for_user_code_under_a_folder_named_relucomp(tmp_path):
    from relucomp.models import load_model

    src = (
        "import torch\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            return x\n"
        "        return -x\n"
        "def make():\n"
        "    return Net()\n"
    )
    folder = tmp_path / "relucomp" / "experiments"
    folder.mkdir(parents=True)
    (folder / "mynet.py").write_text(src)
    model = load_model(f"{folder / 'mynet.py'}:make")
    with pytest.raises(TraceError) as ei:
        trace(model)
    assert "mynet.py:5: if x.mean() > 0:" in ei.value.cause


def test_copy_gm_owns_metadata():
    import torch
    from relucomp.ir import copy_gm, meta, trace
    from relucomp.models import build_model

    gm = trace(build_model("tinycnn"))
    for n in gm.graph.nodes:
        meta(n)["tag"] = "original"
    cp = copy_gm(gm)
    for n in cp.graph.nodes:
        meta(n)["tag"] = "copy"
    assert all(meta(n)["tag"] == "original" for n in gm.graph.nodes)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(gm.eval()(x), cp.eval()(x))

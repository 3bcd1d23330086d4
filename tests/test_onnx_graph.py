"""The one ONNX walker: every comparison-bearing op counted per image, Relu elements kept apart."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from relucomp.onnx_graph import walk


def _model(nodes, inits=(), in_shape=("N", 4, 8, 8), out_name="y", out_shape=None):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=[numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_each_comparison_op_is_counted_per_image():
    E = 4 * 8 * 8  # elements per image
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("Clip", ["r", "lo", "hi"], ["c"], name="relu6"),           # 2 bounds
        helper.make_node("Clip", ["c", "lo"], ["c1"], name="clamp_min"),           # 1 bound
        helper.make_node("Max", ["c1", "zero"], ["m"], name="max"),
        helper.make_node("LeakyRelu", ["m"], ["l"], name="leaky"),
        helper.make_node("HardSwish", ["l"], ["h"], name="hswish"),               # 2 per element
        helper.make_node("MaxPool", ["h"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Greater", ["p", "zero"], ["gt"], name="gt"),
        helper.make_node("Cast", ["gt"], ["gtf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["p", "gtf"], ["y"]),
    ]
    c = walk(_model(nodes, inits=[("lo", 0.0), ("hi", 6.0), ("zero", 0.0)]))
    pooled = 4 * 4 * 4
    # Relu, and the exact ReLU equivalents Clip(x, 0) and Max(x, 0) (clamp(min=0) / clamp_min(0) exported)
    assert c["relus"] == 3 * E and [r["node"] for r in c["relu_nodes"]] == ["relu", "clamp_min", "max"]
    assert c["comparisons_by_op"] == {"Relu": E, "Clip": 3 * E, "Max": E, "LeakyRelu": E, "HardSwish": 2 * E,
                                      "MaxPool": pooled * 3, "Greater": pooled}
    assert c["maxpool_comparisons"] == pooled * 3
    assert c["comparisons"] == sum(c["comparisons_by_op"].values())
    assert c["budgeted_comparisons"] == c["comparisons"] - pooled * 3
    assert walk(_model(nodes, inits=[("lo", 0.0), ("hi", 6.0), ("zero", 0.0)]),
                include_maxpool=True)["budgeted_comparisons"] == c["comparisons"]


def test_reductions_and_shape_arithmetic():
    nodes = [helper.make_node("ReduceMax", ["x", "ax"], ["r"], keepdims=0),  # (N,4,8) from (N,4,8,8)
             helper.make_node("ArgMax", ["r"], ["a"], axis=1, keepdims=0),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Equal", ["s", "s"], ["eq"]),                      # rank-1 shape arithmetic: free
             helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)]
    m = _model(nodes, inits=[], out_shape=None)
    m.graph.initializer.append(numpy_helper.from_array(np.array([3], np.int64), "ax"))
    c = walk(m)
    assert c["comparisons_by_op"] == {"ReduceMax": 256 - 32, "ArgMax": 32 - 8}
    assert c["relus"] == 0


class _Clamped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.clamp(self.conv(x), min=0.0, max=6.0).mean((2, 3)))  # ReLU6: exports as Clip


def test_export_budget_counts_clip_not_only_relu(tmp_path):
    """A ReLU6 has no Relu node but 2 comparisons per element: the budget check counts them (a relucomp bug)."""
    from relucomp.errors import ExportCheckError, ExportError, InternalError
    from relucomp.export import export_onnx

    torch.manual_seed(0)
    m = _Clamped().eval()
    x = torch.randn(1, 3, 8, 8)
    info = export_onnx(m, tmp_path / "ok.onnx", example=x)
    elems = 4 * 8 * 8
    assert info["onnx_relus"] == 0 and info["comparisons_by_op"] == {"Clip": 2 * elems}
    with pytest.raises(ExportCheckError) as ei:
        export_onnx(m, tmp_path / "m.onnx", example=x, max_relus=elems)
    assert isinstance(ei.value, InternalError) and isinstance(ei.value, ExportError)
    assert "Clip" in ei.value.cause and not (tmp_path / "m.onnx").exists()


def test_inspect_estimate_and_verify_agree(tmp_path):
    from relucomp.api import inspect_onnx
    from relucomp.export import export_onnx
    from relucomp.models import tinycnn
    from relucomp.pi.estimate import onnx_costs
    from relucomp.verify import onnx_relu_count

    torch.manual_seed(0)
    path = tmp_path / "t.onnx"
    export_onnx(tinycnn().eval(), path, example=torch.randn(1, 3, 32, 32))
    a, b, c = inspect_onnx(path)["total"], onnx_costs(path), onnx_relu_count(str(path))
    assert a["relus"] == b["relus"] == c["relus"] == 20_480
    assert a["macs"] == b["macs"] > 0 and a["comparisons"] == b["comparisons"] == c["comparisons"]
    assert onnx.load(str(path)).metadata_props  # written with metadata


def test_onnx_counts_agree_with_the_fx_side():
    """The walker counts the exported ops by the fx side's convention (relucomp.ir.comparisons_of_call):
    ReLU equivalents are ReLUs, relu6 / sign 2 per element, smooth activations 1, an infinite clip bound 0."""
    import tempfile
    from pathlib import Path

    import torch.nn.functional as F

    from relucomp.export import _torch_export
    from relucomp.ir import NonlinearityCounter

    class M(nn.Module):
        def forward(self, x):
            # distinct inputs: the exporter merges identical ops (common subexpressions), which the fx side
            # (conservatively) counts once per call
            return (torch.clamp(x, min=0) + (x + 1).clamp_min(0) + F.threshold(x + 2, 0.0, 0.0)
                    + F.leaky_relu(x + 3, 0.0) + F.hardtanh(x + 4, 0.0, float("inf")) + F.relu6(x) + torch.clamp(x, min=-1)
                    + F.leaky_relu(x, 0.1) + torch.sigmoid(x) + torch.tanh(x) + torch.sign(x) + torch.maximum(x, 2 * x)
                    + F.gelu(x))

    x = torch.randn(1, 2, 4, 4)
    counter = NonlinearityCounter()
    with counter:
        M()(x)
    fx_side: dict[str, int] = {}
    for op, n in counter.found:
        fx_side[op] = fx_side.get(op, 0) + n
    with tempfile.TemporaryDirectory() as d:
        _torch_export(M().eval(), x, str(Path(d) / "m.onnx"), 18)
        c = walk(Path(d) / "m.onnx")
    assert fx_side["relu"] == c["relus"] == 5 * 32
    assert sum(fx_side.values()) == c["comparisons"] == 5 * 32 + 2 * 32 + 32 + 32 + 32 + 32 + 2 * 32 + 32 + 32


def test_a_graph_without_a_batch_axis_is_a_one_line_user_error(tmp_path):
    """A Relu whose input has no per-image shape (the batch axis flattened away) cannot be counted: inspect,
    estimate and pi-bench say so with a fix and exit 2 (it was an internal error, exit 3); so do they for a
    file that is not ONNX."""
    from typer.testing import CliRunner

    from relucomp.cli import app
    from relucomp.errors import ModelLoadError

    g = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Gather", ["f", "i"], ["k"]),
         helper.make_node("Relu", ["k"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(np.array([4], np.int64), "s"),
                     numpy_helper.from_array(np.array([0, 2], np.int64), "i")])
    path = tmp_path / "nobatch.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    with pytest.raises(ModelLoadError, match="per-image shape"):
        walk(str(path))
    for cmd in ("inspect", "estimate"):
        r = CliRunner().invoke(app, [cmd, str(path)])
        assert r.exit_code == 2 and "leading batch axis" in r.output and "Traceback" not in r.output, r.output
    bad = tmp_path / "bad.onnx"                              # not ONNX at all: it was an internal error too
    bad.write_text("not onnx")
    for cmd in ("inspect", "estimate"):
        r = CliRunner().invoke(app, [cmd, str(bad)])
        assert r.exit_code == 2 and "not a readable ONNX file" in r.output and "fix:" in r.output, r.output

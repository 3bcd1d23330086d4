"""Verified ONNX export: ReLU count from the graph, ORT equality, dynamic batch, atomic writes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import relucomp.export as export_mod
from relucomp.export import ExportError, export_onnx, ort_run, read_metadata
from relucomp.infra import PassManager
from relucomp.nn import SparseReLU
from relucomp.passes.dce import DeadCodeEliminationPass
from relucomp.passes.fold_bn import FoldBatchNormPass
from relucomp.passes.insert_gates import gates_of
from relucomp.passes.lower_gates import LowerGatesPass
from relucomp.passes.shape_prop import ShapeAnalysisPass
from relucomp.verify import onnx_relu_count
from relucomp.models import tinycnn


@pytest.fixture(scope="module")
def lowered():
    """tinycnn with random partial masks, lowered to SparseReLU (two channel and two pixel sites)."""
    from relucomp.ir import trace
    from relucomp.passes.canonicalize import CanonicalizeReLUPass
    from relucomp.passes.insert_gates import InsertGatesPass

    torch.manual_seed(0)
    model = tinycnn().eval()
    x = torch.randn(4, 3, 32, 32)
    gm = trace(model)
    PassManager([CanonicalizeReLUPass(), ShapeAnalysisPass(x[:1]), InsertGatesPass("channel", sites={"relu1", "relu2"}),
                 InsertGatesPass("pixel")], calibration=x).run(gm)
    gen = torch.Generator().manual_seed(1)
    for g in gates_of(gm).values():
        m = (torch.rand(g.mask.shape, generator=gen) < 0.3).float()
        m.view(-1)[0] = 1.0  # partial: at least one kept
        m.view(-1)[-1] = 0.0  # ... and one dropped
        g.set_mask(m)
    assert [g.granularity for g in gates_of(gm).values()] == ["channel", "channel", "pixel", "pixel"]
    kept = sum(g.kept_relus() for g in gates_of(gm).values())
    gm = PassManager([LowerGatesPass("sparse"), FoldBatchNormPass(), DeadCodeEliminationPass(),
                      ShapeAnalysisPass(x[:1])], calibration=x).run(gm).gm.eval()
    sparse = [m for m in gm.modules() if isinstance(m, SparseReLU)]
    assert [m.by_channel for m in sparse] == [True, True, False, False]
    assert sum(m.kept_relus for m in sparse) == kept
    return gm, x, kept


@pytest.fixture(scope="module")
def exported(lowered, tmp_path_factory):
    gm, x, kept = lowered
    path = tmp_path_factory.mktemp("export") / "sub" / "model.onnx"  # parent created on demand
    info = export_onnx(gm, path, example=x[:1], metadata={"relu_budget": 7000, "architecture": "tinycnn"},
                       max_relus=kept)
    return path, info


def test_export_writes_verified_file(lowered, exported):
    gm, x, kept = lowered
    path, info = exported
    assert path.is_file() and info["path"] == str(path) and info["bytes"] == path.stat().st_size
    assert info["onnx_relus"] == kept and info["relu_nodes"] == 4
    assert info["ort_max_abs_diff"] < 1e-4 and info["verify_batch"] == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temp files left
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_onnx_relu_count_is_counted_from_the_graph(lowered, exported):
    gm, x, kept = lowered
    path, _ = exported
    counts = onnx_relu_count(str(path))
    assert counts["relus"] == kept
    assert len(counts["relu_nodes"]) == 4
    assert sum(r["relus"] for r in counts["relu_nodes"]) == kept
    proto = onnx.load(str(path))
    assert sum(n.op_type == "Relu" for n in proto.graph.node) == 4
    assert onnx_relu_count(proto)["relus"] == kept  # also from a proto


def test_onnx_matches_torch_with_dynamic_batch(lowered, exported):
    gm, x, kept = lowered
    path, _ = exported
    xb = torch.randn(5, 3, 32, 32)
    got = ort_run(path, xb.numpy())
    with torch.no_grad():
        ref = gm(xb).numpy()
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)
    assert ort_run(path, xb[:1].numpy()).shape == (1, 10)


def test_export_metadata(exported, lowered):
    path, _ = exported
    meta = read_metadata(path)
    assert meta["relu_budget"] == 7000 and meta["architecture"] == "tinycnn"
    assert meta["onnx_relu_count"] == lowered[2]
    assert meta["relucomp_version"] == "0.1.0"
    keys = [p.key for p in onnx.load(str(path)).metadata_props]
    assert len(keys) == len(set(keys))


@pytest.fixture
def fast_exporter(exported, monkeypatch):
    """Replace the (slow) torch exporter by a copy of the module's already exported file."""
    data = exported[0].read_bytes()

    def fake_export(model, example, path, opset):
        with open(path, "wb") as f:
            f.write(data)

    monkeypatch.setattr(export_mod, "_torch_export", fake_export)


def test_export_failure_leaves_nothing(lowered, tmp_path, monkeypatch, fast_exporter):
    gm, x, kept = lowered
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(export_mod, "ort_run", lambda path, arr: np.zeros((arr.shape[0], 10), np.float32) + 5.0)
    with pytest.raises(ExportError) as ei:
        export_onnx(gm, out / "model.onnx", example=x[:1])
    assert "onnxruntime output differs" in ei.value.cause and ei.value.fix
    assert list(out.iterdir()) == []  # neither model.onnx nor a temporary file


def test_export_refuses_more_relus_than_budget(lowered, tmp_path, fast_exporter):
    gm, x, kept = lowered
    with pytest.raises(ExportError, match=f"evaluates {kept} ReLUs per image, above the budget {kept - 1}"):
        export_onnx(gm, tmp_path / "model.onnx", example=x[:1], max_relus=kept - 1)
    assert list(tmp_path.iterdir()) == []


def test_export_exporter_crash_leaves_nothing(lowered, tmp_path, monkeypatch):
    gm, x, kept = lowered

    def crash(model, example, path, opset):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export_mod, "_torch_export", crash)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(gm, tmp_path / "model.onnx", example=x[:1])
    assert list(tmp_path.iterdir()) == []


def test_export_unwritable_directory(lowered, tmp_path):
    gm, x, _ = lowered
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ExportError) as ei:
        export_onnx(gm, blocker / "sub" / "model.onnx", example=x[:1])
    assert "cannot create output directory" in ei.value.cause and "writable" in ei.value.fix
    with pytest.raises(ExportError):
        export_onnx(gm, blocker / "model.onnx", example=x[:1])
    assert blocker.read_text() == "not a directory"


def test_the_export_cleanup_writes_the_optimizer_s_graph_from_the_lifted_graph(tmp_path):
    """_torch_export lifts and folds the TorchScript graph's constants before onnxscript's optimizer (whose
    pattern rewriter costs per node): the nodes and initializers are those the optimizer alone makes from the
    raw export, for a graph of many Slices (the `runs` lowering's shape) with a Flatten the rewriter rewrites."""
    import contextlib
    import io
    import warnings

    from onnx import numpy_helper
    from onnxscript import optimizer

    class Runs(torch.nn.Module):
        def forward(self, x):
            f = torch.flatten(x, 1)
            parts = [torch.relu(f[:, i:i + 3]) if i % 2 else f[:, i:i + 3] for i in range(0, 60, 3)]
            return torch.cat(parts, 1) * 2.0

    x = torch.randn(1, 2, 5, 6)
    fast = tmp_path / "fast.onnx"
    export_mod._torch_export(Runs().eval(), x, str(fast), 18)
    raw = tmp_path / "raw.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Runs().eval(), (x,), str(raw), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18)
    a, b = onnx.load(fast), optimizer.optimize(onnx.load(raw))
    assert len(onnx.load(raw).graph.node) > 2 * len(b.graph.node)      # the raw graph is mostly Constant nodes

    def nodes(m):
        return [(n.op_type, list(n.input), list(n.output), [onnx.helper.get_attribute_value(t) for t in n.attribute])
                for n in m.graph.node]

    def inits(m):
        return {i.name: numpy_helper.to_array(i).tolist() for i in m.graph.initializer}

    assert nodes(a) == nodes(b) and inits(a) == inits(b)
    ops = [n.op_type for n in a.graph.node]
    assert ops.count("Slice") == 20 and "Flatten" not in ops and "Constant" not in ops
    np.testing.assert_allclose(ort_run(fast, x.numpy()), Runs()(x).numpy(), rtol=1e-6)

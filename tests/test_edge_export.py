"""Export targets (relucomp/export_targets.py, passes/edge_lowering.py): the edge export is one Max(x, x·s) per
partial layer, numerically equal to the compiled torch model, with the same kept-ReLU semantics; the pi export's
ReLU count (from the graph) equals the mask's kept count; both export from model.pt without retraining."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from relucomp.pipelines import build_gated, lowering_passes
from relucomp.stages.export import save_compiled
from relucomp.errors import RelucompError
from relucomp.export import ort_run, read_metadata
from relucomp.export_targets import describe, export_compiled, export_model, parse_target
from relucomp.infra import PassManager
from relucomp.passes.edge_lowering import ChannelMaskedReLU, EdgeLoweringPass, MaskedReLU
from relucomp.passes.insert_gates import gates_of
from relucomp.verify import onnx_relu_count

from test_pi_lowering import _gated  # noqa: E402  (same small conv net with BN, residual, linear ReLU)


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_edge_and_pi_exports_equal_torch(tmp_path, granularity):
    gm, x, kept = _gated(granularity, 3)
    with torch.no_grad():
        ref = gm(x)
    partial = sum(1 for g in gates_of(gm).values() if 0 < int(g.mask.sum()) < g.mask.numel())
    xs = torch.randn(6, *x.shape[1:])
    with torch.no_grad():
        ref_v = gm(xs).numpy()
    outs = {}
    for target in ("edge", "pi"):
        g2, _, _ = _gated(granularity, 3)
        low = PassManager(lowering_passes(x, gate_form=target), calibration=x).run(g2).gm
        with torch.no_grad():
            assert torch.allclose(low(x), ref, atol=1e-5)
        path = tmp_path / f"{target}.onnx"
        res = export_model(low, path, target, example=x[:1], verify_batch=xs, budget=kept)
        assert read_metadata(path)["export_target"] == target
        outs[target] = ort_run(path, xs.numpy())
        assert np.allclose(outs[target], ref_v, atol=1e-4, rtol=1e-3), target
        ops = _ops(path)
        if target == "edge":
            assert not {"Gather", "GatherElements", "Concat", "Slice", "Where"} & set(ops)
            assert sum(isinstance(m, MaskedReLU) for m in low.modules()) == partial > 0
            chan = sum(isinstance(m, ChannelMaskedReLU) for m in low.modules())
            # channel gates of a conv feature map: x + Relu(depthwise 1×1 conv(x; −m)); the rest Max(x, x·s)
            assert ops.count("Max") == ops.count("Mul") == partial - chan
            groups = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" for a in n.attribute
                      if a.name == "group" and a.i > 1]
            assert len(groups) == chan and (chan > 0) == (granularity == "channel")
        else:
            assert res["onnx_relus"] == kept == onnx_relu_count(str(path))["relus"]
            assert "Max" not in ops
    assert np.allclose(outs["edge"], outs["pi"], atol=1e-4, rtol=1e-3)


class _Probe(nn.Module):
    """x → identity 1×1 conv → ReLU → output: the exported layer's output is the activation itself."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(c)[:, :, None, None])
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x))


@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_edge_export_rectifies_exactly_the_kept_elements(tmp_path, granularity):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5)
    gm, _ = build_gated(_Probe().eval(), x, granularity=granularity)
    gate = next(iter(gates_of(gm).values()))
    m = (torch.rand(gate.mask.shape, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    m.view(-1)[0], m.view(-1)[-1] = 1.0, 0.0
    gate.set_mask(m)
    keep = m.expand(1, *gate.act_shape)[0].bool().numpy()
    low = PassManager(lowering_passes(x, gate_form="edge"), calibration=x).run(gm.eval()).gm
    path = tmp_path / "probe.onnx"
    export_model(low, path, "edge", example=x[:1])
    mag = np.abs(np.random.default_rng(0).standard_normal((1, 4, 5, 5))).astype(np.float32) + 1e-3
    for eps in (1.0, 1e-3):
        pos = ort_run(path, eps * mag)[0]
        neg = ort_run(path, -eps * mag)[0]
        assert np.allclose(pos, eps * mag[0])  # positive inputs pass everywhere
        rectified = neg == 0.0
        assert np.array_equal(rectified, keep)  # negative inputs are zeroed exactly at the kept elements
        assert np.allclose(neg[~keep], -eps * mag[0][~keep])  # and pass unchanged where the ReLU was removed


def test_edge_pass_leaves_other_nodes_alone():
    gm, x, _ = _gated("pixel", 5)
    low = PassManager(lowering_passes(x, gate_form="sparse"), calibration=x).run(gm).gm
    before = [(n.op, str(n.target)) for n in low.graph.nodes]
    res = EdgeLoweringPass().call(low)
    assert res.modified and res.stats["lowered"] == len(res.stats["layers"]) > 0
    assert [(n.op, str(n.target)) for n in res.gm.graph.nodes] == before  # same graph, modules swapped in place
    assert not EdgeLoweringPass().call(res.gm).modified  # idempotent


def test_export_compiled_both_targets(tmp_path):
    gm, x, kept = _gated("pixel", 9)
    from test_pi_lowering import Net

    save_compiled(tmp_path / "model.pt", {k: v.clone() for k, v in gm.state_dict().items()}, spec=None, num_classes=5,
                  granularity="pixel", image_size=6, gate_form="pi", budget=kept)
    torch.manual_seed(9)
    res = export_compiled(tmp_path, "both", model=Net(), verify_batch=torch.randn(4, 3, 6, 6))
    assert set(res) == {"pi", "edge"}
    # every gated layer of _gated is partial (one kept and one linear entry at least): each is an extra pass
    partial = [g for g in gates_of(gm).values() if 0 < int(g.mask.sum()) < g.mask.numel()]
    assert res["edge"]["partial_layers"] == len(partial) > 0 and "partial_layers" not in res["pi"]
    from relucomp.cli.compile import export_line
    assert f"{len(partial)} partially linearized layers" in export_line(res["edge"])
    assert "--granularity layer" in export_line(res["edge"]) and "partially" not in export_line(res["pi"])
    assert "(plaintext," in export_line(res["edge"]) and f"({kept:,} ReLUs in graph" in export_line(res["pi"])
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.edge.onnx").exists()
    assert read_metadata(tmp_path / "model.onnx")["export_target"] == "pi"
    meta = read_metadata(tmp_path / "model.edge.onnx")
    assert meta["export_target"] == "edge" and meta["relu_count"] == kept
    assert "edge" in describe(meta)
    from typer.testing import CliRunner

    from relucomp.cli import app

    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "model.edge.onnx")])
    assert r.exit_code == 0 and "export target: edge" in " ".join(r.output.split())
    assert onnx_relu_count(str(tmp_path / "model.onnx"))["relus"] == kept
    xs = np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = gm.eval()(torch.from_numpy(xs)).numpy()
    for f in ("model.onnx", "model.edge.onnx"):
        assert np.allclose(ort_run(tmp_path / f, xs), ref, atol=1e-4, rtol=1e-3), f


def test_export_target_errors(tmp_path):
    assert parse_target("both") == ("pi", "edge") and parse_target("EDGE") == ("edge",)
    with pytest.raises(RelucompError, match="export target"):
        parse_target("gpu")
    with pytest.raises(RelucompError, match="does not exist"):
        export_compiled(tmp_path / "nothing", "edge")


def test_compile_export_target_both(tmp_path, monkeypatch):
    from relucomp import api

    monkeypatch.setenv("RELUCOMP_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RelucompError, match="export target"):  # refused before any training
        api.compile("tinycnn", "synthetic", relu_budget="2k", export_target="cpu", limit=300, progress=False)
    res = api.compile("tinycnn", "synthetic", relu_budget="2k", pretrain_epochs=0, limit=300, search_epochs=1,
                      finetune_epochs=0, progress=False, out_dir=tmp_path / "out", export_target="both")
    out = tmp_path / "out"
    assert read_metadata(out / "model.onnx")["export_target"] == "pi"
    meta = read_metadata(out / "model.edge.onnx")
    assert meta["export_target"] == "edge" and meta["relu_budget"] == 2000 and "accuracy_test" in meta
    assert res.report.exports["edge"]["export_target"] == "edge" and res.report.exports["pi"] is res.report.export
    assert res.report.options["export_target"] == "both" and res.onnx_path == out / "model.onnx"
    assert onnx_relu_count(str(out / "model.onnx"))["relus"] == res.relus
    xs = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = res.model(torch.from_numpy(xs)).numpy()
    assert np.allclose(ort_run(out / "model.edge.onnx", xs), ref, atol=1e-4, rtol=1e-3)
    # relucomp export OUT: re-exports from model.pt without retraining (the command only parses and calls)
    from typer.testing import CliRunner

    from relucomp.cli import app

    (out / "model.edge.onnx").unlink()
    r = CliRunner().invoke(app, ["export", str(out), "--export-target", "edge"])
    assert r.exit_code == 0, r.output
    assert "edge:" in r.output and read_metadata(out / "model.edge.onnx")["export_target"] == "edge"
    n = res.report.exports["edge"]["partial_layers"]
    assert (f"{n} partially linearized layer" in " ".join(r.output.split())) == (n > 0)
    assert read_metadata(out / "model.edge.onnx")["accuracy_test"] == meta["accuracy_test"]  # carried from model.onnx
    assert np.allclose(ort_run(out / "model.edge.onnx", xs), ref, atol=1e-4, rtol=1e-3)


def test_cli_export_target_refused_before_training(tmp_path):
    from typer.testing import CliRunner

    from relucomp.cli import app

    r = CliRunner().invoke(app, ["compile", "tinycnn", "-b", "2k", "--export-target", "gpu", "--out", str(tmp_path / "o")])
    flat = " ".join(r.output.split())           # rich wraps at the terminal's width, which varies with the path
    assert r.exit_code == 2 and "unknown export target 'gpu'" in flat and "--export-target pi | edge | both" in flat
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["compile", "tinycnn", "-b", "2k", "--export-target", "edge", "--print-config"])
    assert r.exit_code == 0 and 'target = "edge"' in r.output
    r = CliRunner().invoke(app, ["export", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())

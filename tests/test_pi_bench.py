"""relucomp.pi: ONNX→JAX translation (vs onnxruntime), cost estimates, and a real 2PC run when SPU is set up.

The SPU venv (`relucomp pi-bench --setup`) is optional: without it the real run is skipped with a message,
and the translation is checked in-process only if jax is importable in this environment.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from relucomp.export import export_onnx, ort_run
from relucomp.pi import bench
from relucomp.pi.estimate import estimate, fit, onnx_costs, predict
from relucomp.verify import onnx_relu_count

HAS_JAX = importlib.util.find_spec("jax") is not None
NO_SPU = "SPU venv not set up (run `relucomp pi-bench --setup` to build it); skipping the real 2PC run"


class Ops(nn.Module):
    """The ops relucomp emits and the translator must cover (BN left unfolded on purpose)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.mp = nn.MaxPool2d(2)
        self.ap = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(8 * 2 * 2, 6)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = self.ap(self.mp(self.dw(h))) * 0.5 + h[:, :, ::2, ::2]
        h = torch.nn.functional.adaptive_avg_pool2d(h, 2)
        keep = torch.tensor([0, 3, 5, 6, 9, 12, 20, 31])
        flat = torch.flatten(h, 1)
        g = torch.cat([torch.relu(flat[:, keep]), flat], 1)[:, :32]
        return self.fc(g) + h.mean((2, 3)).sum(1, keepdim=True)


def _lowered_onnx(tmp_path, granularity="pixel"):
    from tests.test_pi_lowering import _gated
    from relucomp.api import lowering_passes
    from relucomp.infra import PassManager

    gm, x, kept = _gated(granularity, 11, c=6, hw=6)
    low = PassManager(lowering_passes(x, gate_form="pi"), calibration=x).run(gm).gm
    path = tmp_path / f"{granularity}.onnx"
    export_onnx(low, path, example=x[:1], max_relus=kept)
    return path, kept


def _jax_outputs(path, x):
    if HAS_JAX:
        import jax

        from relucomp.pi import onnx2jax

        m = onnx2jax.translate(str(path))
        return np.asarray(jax.jit(lambda x, *p: m(x, *p))(x, *m.params()))
    if bench.venv_python() is not None:
        return bench.plaintext_jax(path, x)
    pytest.skip("jax is not importable here and the SPU venv is not set up (`relucomp pi-bench --setup`)")


def test_onnx2jax_matches_onnxruntime(tmp_path):
    torch.manual_seed(0)
    m = Ops().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "ops.onnx"
    export_onnx(m, path, example=x[:1])
    paths = [path, _lowered_onnx(tmp_path, "pixel")[0], _lowered_onnx(tmp_path, "channel")[0]]
    for p in paths:
        xin = np.random.default_rng(0).standard_normal((2, 3, *((8, 8) if p == path else (6, 6)))).astype(np.float32)
        got = _jax_outputs(p, xin)
        ref = ort_run(p, xin)
        assert got.shape == ref.shape
        assert np.allclose(got, ref, atol=1e-4, rtol=1e-4), (p, float(np.abs(got - ref).max()))


def test_onnx_costs_and_estimate(tmp_path):
    path, kept = _lowered_onnx(tmp_path, "pixel")
    costs = onnx_costs(path)
    assert costs["relus"] == kept == onnx_relu_count(str(path))["relus"]
    assert costs["macs"] > 0 and costs["input_shape"] == [1, 3, 6, 6]
    est = estimate(str(path))
    assert est["predicted"]["latency_s"] > est["linear_floor"]["latency_s"] > 0
    more = estimate(str(path), relus=kept + 10_000)
    assert more["predicted"]["latency_s"] > est["predicted"]["latency_s"]
    runs = [{"name": f"r{i}", "relus": r, "macs": m, "gather_elements": 0, "maxpool_comparisons": 0,
             "latency_s": 0.4 + 16e-6 * r + 1e-8 * m, "bytes": 3e5 + 100 * r + 0.02 * m}
            for i, (r, m) in enumerate([(0, 1e7), (70000, 1e7), (20000, 3e7), (5000, 5e7), (40000, 2e7)])]
    model = fit(runs)
    assert model["error"]["latency_max_abs_rel"] < 1e-3
    assert abs(predict({"relus": 10000, "macs": 2e7}, model)["latency_s"] - (0.4 + 0.16 + 0.2)) < 1e-3


def test_cli_estimate_and_missing_venv(tmp_path, monkeypatch):
    from relucomp.cli import app

    path, kept = _lowered_onnx(tmp_path, "channel")
    r = CliRunner().invoke(app, ["estimate", str(path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["costs"]["relus"] == kept
    monkeypatch.setenv("RELUCOMP_PI_VENV", str(tmp_path / "no-venv"))
    r = CliRunner().invoke(app, ["pi-bench", str(path)])
    assert r.exit_code == 2
    assert "SPU venv is not set up" in " ".join(r.output.split()) and "--setup" in r.output


@pytest.mark.skipif(bench.venv_python() is None, reason=NO_SPU)
def test_real_pi_bench(tmp_path):
    path, kept = _lowered_onnx(tmp_path, "pixel")
    res = bench.pi_bench(path, protocol="cheetah", repeat=1, timeout=600)
    assert res["relus"] == kept
    assert res["latency_s"] > 0 and res["bytes"] > 0 and res["first_run_s"] >= res["latency_s"] * 0.5
    assert res["error"]["max_abs_vs_onnxruntime"] < 1e-2
    assert res["machine"]["network"].startswith("loopback")


def test_run_stats_and_fit_on_means(tmp_path):
    """pi-bench reports mean, median and slow runs; the cost model is fitted on means and estimate says so."""
    s = bench.run_stats([1.0, 1.1, 1.0, 3.0, 1.05, 1.0], [100, 100, 100, 220, 100, 100])
    assert s["slow_runs"] == 1 and s["slow_run_indices"] == [3]
    assert abs(s["latency_mean_s"] - 8.15 / 6) < 1e-9 and s["latency_median_s"] == 1.025
    assert abs(s["bytes_mean"] - 720 / 6) < 1e-9
    assert bench.DEFAULT_REPEAT >= 6
    runs = [{"name": f"r{i}", "relus": r, "macs": 1e7, "gather_elements": 0, "maxpool_comparisons": 0,
             "latency_s": 0.4 + 15e-6 * r, "latency_mean_s": 0.5 + 20e-6 * r, "bytes": 1e5 + 100 * r}
            for i, r in enumerate([0, 20000, 40000, 70000])]
    on_mean, on_median = fit(runs), fit(runs, statistic="median")
    assert on_mean["statistic"] == "mean" and abs(on_mean["latency_s"]["relus"] - 20e-6) < 1e-7
    assert abs(on_median["latency_s"]["relus"] - 15e-6) < 1e-7
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps({"default": "cheetah-private", "statistic": "mean",
                              "configs": {"cheetah-private": on_mean}}))
    path, _ = _lowered_onnx(tmp_path, "pixel")
    assert estimate(str(path), cost_model=cm)["statistic"] == "mean"
    assert estimate(str(path))["statistic"] in ("mean", "median")  # the shipped model says which


def test_relu_calls_feature_fits_and_predicts(tmp_path):
    """A ReLU node is one protocol call: the cost model counts calls apart from ReLUs (none left, no call)."""
    from relucomp.pi.estimate import relu_calls

    path, kept = _lowered_onnx(tmp_path, "pixel")
    costs = onnx_costs(path)
    assert relu_calls(costs) == costs["relu_nodes"] >= 1
    assert relu_calls({**costs, "relus": 0, "maxpool_comparisons": 0}) == 0
    # runs whose latency has a per-call term: the fit recovers it where calls vary apart from ReLUs
    truth = {"const": 0.3, "relus": 20e-6, "relu_calls": 0.02}
    runs = [{"name": f"r{i}", "relus": r, "relu_nodes": c, "macs": 1e7, "gather_elements": 0, "maxpool_comparisons": 0,
             "latency_s": truth["const"] + truth["relus"] * r + truth["relu_calls"] * (c if r else 0), "bytes": 1e5 + 100 * r}
            for i, (r, c) in enumerate([(0, 7), (7, 1), (7, 7), (7360, 6), (18432, 7), (73728, 7), (188416, 19)])]
    model = fit(runs)
    assert abs(model["latency_s"]["relu_calls"] - 0.02) < 1e-4 and abs(model["latency_s"]["relus"] - 20e-6) < 1e-8
    assert [row["relu_calls"] for row in model["fit"]] == [0, 1, 7, 6, 7, 7, 19]
    # pinned (measured apart), the rest is fitted around it
    pinned = fit(runs, fixed={"latency_s": {"relu_calls": 0.02}})
    assert pinned["latency_s"]["relu_calls"] == 0.02 and pinned["error"]["latency_max_abs_rel"] < 1e-6
    # the shipped model prices calls, and the linear floor (0 ReLUs) has none
    cm = tmp_path / "cm.json"
    cm.write_text(json.dumps({"default": "c", "statistic": "mean", "configs": {"c": model}}))
    est = estimate(str(path), cost_model=cm)
    want = truth["const"] + truth["relus"] * kept + truth["relu_calls"] * costs["relu_nodes"]  # macs: constant, unfitted
    assert model["latency_s"]["macs"] == 0.0 and abs(est["predicted"]["latency_s"] - want) < 1e-6
    assert abs(est["linear_floor"]["latency_s"] - model["latency_s"]["const"]) < 1e-9

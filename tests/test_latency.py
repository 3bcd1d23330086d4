"""relucomp.latency: the interleaved onnxruntime timing the benchmarks share."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from relucomp.latency import SPINNING_KEY, interleaved_latency, latency_stats, ort_session


def _conv_model(path, channels: int):
    w = np.random.default_rng(0).standard_normal((channels, 3, 3, 3)).astype(np.float32)
    g = h.make_graph([h.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["a"], ["y"])],
                     "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", channels, 8, 8])], [nh.from_array(w, "w")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 18)]), str(path))
    return str(path)


def test_sessions_do_not_spin_unless_asked(tmp_path):
    p = _conv_model(tmp_path / "m.onnx", 4)
    assert ort_session(p, threads=2).get_session_options().get_session_config_entry(SPINNING_KEY) == "0"
    assert ort_session(p, threads=2, spinning=True).get_session_options().get_session_config_entry(SPINNING_KEY) == "1"


def test_interleaved_latency_times_every_model_every_repeat(tmp_path):
    paths = {"small": _conv_model(tmp_path / "s.onnx", 4), "big": _conv_model(tmp_path / "b.onnx", 256)}
    r = interleaved_latency(paths, threads=1, batch=16, repeats=5, inner=2, shape=(3, 8, 8))
    assert set(r["variants"]) == {"small", "big"} and r["spinning"] is False
    for v in r["variants"].values():
        assert v["n"] == 5 and 0 < v["min_ms"] <= v["iqr_ms"][0] <= v["median_ms"] <= v["iqr_ms"][1]
    # 64× the output channels (and MACs) is measurably slower, whatever the machine's load
    assert r["variants"]["big"]["median_ms"] > r["variants"]["small"]["median_ms"]
    assert len(r["loadavg_before"]) == 3 and len(r["loadavg_after"]) == 3


def test_latency_stats_and_bad_arguments(tmp_path):
    s = latency_stats([0.001, 0.002, 0.003, 0.004, 0.005])
    assert s == {"median_ms": 3.0, "iqr_ms": [2.0, 4.0], "min_ms": 1.0, "n": 5}
    with pytest.raises(ValueError, match="at least one model"):
        interleaved_latency({}, threads=1, batch=1, repeats=1)
    with pytest.raises(ValueError, match=">= 1"):
        interleaved_latency({"m": _conv_model(tmp_path / "m.onnx", 4)}, threads=1, batch=1, repeats=0)

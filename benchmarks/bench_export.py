"""Export targets in plain onnxruntime (issue 15) → benchmarks/results/export.json.

resnet8 (73,728 ReLUs, 32×32) with **random masks of exact budgets** (36,864 /
18,432 / 7,360 ReLUs; pixel and channel gates; latency does not depend on the
weights' values), plus whole-layer masks keeping 28,672 (four of the seven ReLU
layers fully linearized), exported three ways:

* ``dense`` — every ReLU kept (the model you started from, BN folded);
* ``edge``  — ``gate_form="edge"`` (passes/edge_lowering.py): one ``Max(x, x·s)``
  per partial layer, fully linear layers folded;
* ``pi``    — ``gate_form="pi"`` (passes/pi_lowering.py): ``Relu`` only on the kept
  elements (Gather / Slice / compaction networks around them).

Latency: onnxruntime CPU, 1 and 2 intra-op threads, batch 1 and 64; every repeat
runs **all variants once, in a fresh random order** (interleaved, so load from
other jobs hits them equally); ≥ 30 repeats; median and IQR per variant; a batch-1
sample is the mean of ``--inner`` back-to-back runs (timer resolution).  The
machine's ``os.getloadavg()`` is recorded before and
after each setting, and timings under load are upper bounds.

Also measured (``elementwise_forms``): the candidate single-layer forms of a
partial ReLU after a 3×3 conv at resnet8's three activation shapes (PRelu,
Where, Max(x, x·s), x − m·min(x, 0)), which chose the edge form; and
(``channel_split_forms``) the conv-split route for channel masks kept in aligned
blocks of 8 (a kept conv with the Relu fused beside a linear one, joined by
Concat or carried as two streams into summed sub-convs), against the shipped
depthwise form — the measurement that decided not to build it.

Usage: python benchmarks/bench_export.py [--repeats 30] [--quick] [--split-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
logging.getLogger("torch.onnx").setLevel(logging.ERROR)

from relucomp.atomic import atomic_write_json  # noqa: E402
from relucomp.pipelines import build_gated, lowering_passes  # noqa: E402
from relucomp.export_targets import export_model  # noqa: E402
from relucomp.infra import PassManager  # noqa: E402
from relucomp.latency import SPINNING_KEY, interleaved_latency  # noqa: E402
from relucomp.models import load_model  # noqa: E402
from relucomp.passes.insert_gates import gates_of  # noqa: E402
from relucomp.pi.bench import machine_info  # noqa: E402
from relucomp.verify import onnx_relu_count  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from bench_pi import exact_masks  # noqa: E402

BUDGETS = [36_864, 18_432, 7_360]


def _gated(granularity: str, budget: int | None, seed: int = 0, layers_off: tuple[int, ...] = ()):
    torch.manual_seed(seed)
    model = load_model("resnet8", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    gm, _ = build_gated(model, x, granularity=granularity)
    gates = list(gates_of(gm).values())
    if budget is None:
        for i, g in enumerate(gates):
            g.set_mask(torch.zeros_like(g.mask) if i in layers_off else torch.ones_like(g.mask))
    else:
        exact_masks(gm, budget, granularity, seed)
    return gm.eval(), x


def build(out: Path, name: str, target: str, granularity: str, budget: int | None, layers_off=()) -> dict:
    gm, x = _gated(granularity, budget, layers_off=layers_off)
    kept = sum(g.kept_relus() for g in gates_of(gm).values())
    with torch.no_grad():
        ref = gm(x)
    pm = PassManager(lowering_passes(x, gate_form=target), calibration=x)
    low = pm.run(gm).gm
    with torch.no_grad():
        diff = float((low(x) - ref).abs().max())
    assert diff < 1e-4, (name, diff)
    path = out / f"{name}.onnx"
    t0 = time.perf_counter()
    if target == "pi":
        # TorchScript exporter with a dynamic batch: the dynamo exporter takes minutes on compaction networks
        torch.onnx.export(low, (x[:1],), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=18)
        from relucomp.export import ort_run

        got = ort_run(path, x.numpy())
        assert np.abs(got - ref.numpy()).max() < 1e-3
        counted = onnx_relu_count(str(path))["relus"]
        assert counted == kept, (name, counted, kept)
    else:
        export_model(low, path, target, example=x[:1], verify_batch=x)
        counted = onnx_relu_count(str(path))["relus"]
    forms = next((r.stats.get("forms") for r in pm.records if r.name == "PILoweringPass"), None)
    import onnx

    ops: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"onnx": str(path), "target": target, "granularity": granularity, "relus_kept": kept,
            "relu_elements_in_graph": counted, "torch_max_abs_diff": diff, "export_s": round(time.perf_counter() - t0, 1),
            "pi_forms": forms, "ops": ops}


def _optimized_ops(path, out) -> dict:
    """Op counts of the graph onnxruntime actually runs (default ORT_ENABLE_ALL: fusions, NCHWc layout)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(str(out)).graph.node:
        act = next((a.s.decode() for a in n.attribute if a.name == "activation"), None)
        k = n.op_type + (f"+{act}" if act else "")
        ops[k] = ops.get(k, 0) + 1
    return ops


def elementwise_forms(repeats: int) -> dict:
    """The candidate forms of one partial layer after a 3×3 conv (what chose the edge form)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    forms = ["relu (dense, fused)", "prelu", "where", "max_x_xs", "x_minus_m_min", "channel max_x_xs",
             "channel dw_relu_add"]

    def graph(C, H, form):
        W = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.1
        m = rng.random((C, H, H)) < 0.5
        if form.startswith("channel"):  # a channel mask: kept channels first half (any mask costs the same)
            m = np.zeros((C, 1, 1), bool)
            m[: C // 2] = True
        inits = [nh.from_array(W, "W1"), nh.from_array(W, "W2")]
        nodes = [h.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1])]
        if form.startswith("relu"):
            nodes.append(h.make_node("Relu", ["a"], ["b"]))
        elif form == "prelu":
            inits.append(nh.from_array((~m).astype(np.float32), "s"))
            nodes.append(h.make_node("PRelu", ["a", "s"], ["b"]))
        elif form == "where":
            inits.append(nh.from_array(m, "m"))
            nodes += [h.make_node("Relu", ["a"], ["r"]), h.make_node("Where", ["m", "r", "a"], ["b"])]
        elif form == "channel dw_relu_add":  # x + Relu(depthwise 1x1 conv(x; -m))
            inits.append(nh.from_array(-m.astype(np.float32).reshape(C, 1, 1, 1), "w"))
            nodes += [h.make_node("Conv", ["a", "w"], ["t"], group=C), h.make_node("Relu", ["t"], ["u"]),
                      h.make_node("Add", ["a", "u"], ["b"])]
        elif form.endswith("max_x_xs"):
            inits.append(nh.from_array((~m).astype(np.float32), "s"))
            nodes += [h.make_node("Mul", ["a", "s"], ["t"]), h.make_node("Max", ["a", "t"], ["b"])]
        else:
            inits += [nh.from_array(m.astype(np.float32), "s"), nh.from_array(np.zeros((), np.float32), "z")]
            nodes += [h.make_node("Min", ["a", "z"], ["t"]), h.make_node("Mul", ["t", "s"], ["u"]),
                      h.make_node("Sub", ["a", "u"], ["b"])]
        nodes.append(h.make_node("Conv", ["b", "W2"], ["y"], pads=[1, 1, 1, 1]))
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", C, H, H])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", C, H, H])], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])

    return _time_forms(graph, forms, repeats, "forms")


def _time_forms(graph, forms: list[str], repeats: int, label: str, with_ops: bool = False) -> dict:
    """Time ``graph(C, H, form)`` for every form at resnet8's three activation shapes, interleaved, 1/2 threads ×
    b1/b64; ``ratio_to_dense`` against the first form; ``with_ops``: the graph onnxruntime runs, per form."""
    import onnx

    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for C, H in ((16, 32), (32, 16), (64, 8)):
            paths = {}
            for i, f in enumerate(forms):
                p = Path(tmp) / f"{C}-{i}.onnx"
                onnx.save(graph(C, H, f), str(p))
                paths[f] = str(p)
                if with_ops:
                    out.setdefault("ort_optimized_ops", {})[f"{C}x{H}x{H}-{f}"] = _optimized_ops(p, Path(tmp) / f"{C}-{i}.opt.onnx")
            for threads in (1, 2):
                for batch in (1, 64):
                    r = interleaved_latency(paths, threads=threads, batch=batch, repeats=repeats,
                                            inner=10 if batch == 1 else 1, shape=(C, H, H))
                    d = r["variants"][forms[0]]["median_ms"]
                    r["ratio_to_dense"] = {k: round(v["median_ms"] / d, 3) for k, v in r["variants"].items()}
                    key = f"{C}x{H}x{H}-t{threads}-b{batch}"
                    out[key] = r
                    print(f"{label} {key}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r["ratio_to_dense"].items()),
                          flush=True)
    return out


def channel_split_forms(repeats: int) -> dict:
    """The conv-split route for channel masks, measured before building it (README, "Edge: why these forms").

    A chain of 4 3×3 convs at each of resnet8's activation shapes, every conv's output under a channel mask
    that keeps half the channels **in aligned blocks of 8** (the best case for onnxruntime's NCHWc layout,
    which blocks channels by 8 on AVX2): ``dense`` (every ReLU fused), ``dw_relu_add`` (the shipped edge form,
    ``x + Relu(DepthwiseConv1×1(x; −m))``), ``split_concat`` (each conv split by output channels into a kept
    part with the ``Relu`` fused and a linear part, joined by an NCHWc ``Concat``) and ``split_sum`` (the
    stream carried as two tensors, each conv split into four sub-convs — output part × input part — summed,
    which onnxruntime fuses as NCHWc ``Sum``: no extra pass over the activation, more and smaller convs)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    depth = 4

    def graph(C, H, form):
        half, inits, nodes = C // 2, [], []

        def w(name, co, ci):
            inits.append(nh.from_array(rng.standard_normal((co, ci, 3, 3)).astype(np.float32) * 0.1, name))
            return name

        def conv(x, wname, y, bias=None, act=False, **kw):
            nodes.append(h.make_node("Conv", [x, wname] + ([bias] if bias else []), [y], pads=[1, 1, 1, 1], **kw))
            if act:
                nodes.append(h.make_node("Relu", [y], [y + "_r"]))
                return y + "_r"
            return y

        x = "x"
        if form in ("dense", "dw_relu_add", "split_concat"):
            for i in range(depth):
                if form == "dense":
                    x = conv(x, w(f"W{i}", C, C), f"c{i}", act=True)
                elif form == "dw_relu_add":
                    a = conv(x, w(f"W{i}", C, C), f"c{i}")
                    m = np.zeros((C, 1, 1, 1), np.float32)
                    m[:half] = -1.0
                    inits.append(nh.from_array(m, f"dw{i}"))
                    nodes += [h.make_node("Conv", [a, f"dw{i}"], [f"t{i}"], group=C),
                              h.make_node("Relu", [f"t{i}"], [f"u{i}"]), h.make_node("Add", [a, f"u{i}"], [f"b{i}"])]
                    x = f"b{i}"
                else:
                    k = conv(x, w(f"Wk{i}", half, C), f"k{i}", act=True)
                    l_ = conv(x, w(f"Wl{i}", half, C), f"l{i}")
                    nodes.append(h.make_node("Concat", [k, l_], [f"b{i}"], axis=1))
                    x = f"b{i}"
        else:  # split_sum: two streams (kept, linear); each conv = 4 sub-convs, summed per output part
            k = conv(x, w("Wk0", half, C), "k0", act=True)
            l_ = conv(x, w("Wl0", half, C), "l0")
            for i in range(1, depth):
                kk, kl = conv(k, w(f"Wkk{i}", half, half), f"kk{i}"), conv(l_, w(f"Wkl{i}", half, half), f"kl{i}")
                lk, ll = conv(k, w(f"Wlk{i}", half, half), f"lk{i}"), conv(l_, w(f"Wll{i}", half, half), f"ll{i}")
                nodes += [h.make_node("Add", [kk, kl], [f"ks{i}"]), h.make_node("Relu", [f"ks{i}"], [f"k{i}"]),
                          h.make_node("Add", [lk, ll], [f"l{i}"])]
                k, l_ = f"k{i}", f"l{i}"
            nodes.append(h.make_node("Concat", [k, l_], ["b"], axis=1))
            x = "b"
        nodes.append(h.make_node("Identity", [x], ["y"]))
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, ["N", C, H, H])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", C, H, H])], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 18)])

    forms = ["dense", "dw_relu_add", "split_concat", "split_sum"]
    out = {"setup": {"chain": f"{depth} 3x3 convs, every output under a channel mask keeping half the "
                              "channels in aligned blocks of 8", "forms": forms},
           **_time_forms(graph, forms, repeats, "split", with_ops=True)}
    ratios = {f: [out[k]["ratio_to_dense"][f] for k in out if "ratio_to_dense" in out.get(k, {})] for f in forms}
    out["summary"] = {f: [min(v), max(v)] for f, v in ratios.items()}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=10, help="batch-1 runs per sample")
    ap.add_argument("--quick", action="store_true", help="one budget, 10 repeats")
    ap.add_argument("--no-forms", action="store_true")
    ap.add_argument("--split-only", action="store_true",
                    help="measure only the channel conv-split study and add it to --out (the rest kept)")
    ap.add_argument("--out", default=str(ROOT / "results" / "export.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    repeats = 10 if a.quick else a.repeats
    study_repeats = 5 if a.quick else max(10, repeats // 2)  # the single-layer studies (elementwise, split)
    budgets = BUDGETS[1:2] if a.quick else BUDGETS
    t_start = time.time()
    if a.split_only:
        out = Path(a.out)
        res = json.loads(out.read_text())
        res["channel_split_forms"] = channel_split_forms(study_repeats)
        res["channel_split_forms"]["machine"] = {**machine_info(), "loadavg_end": os.getloadavg(),
                                                 "measured_at": time.strftime("%Y-%m-%d %H:%M")}
        atomic_write_json(out, res)
        print(json.dumps(res["channel_split_forms"]["summary"]), f"wrote {out}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="relucomp-bench-export-"))
    built = {"dense": build(work, "dense", "edge", "pixel", None)}  # every ReLU kept: same exporter as edge
    specs = [(f"{g}-{b}", g, b, ()) for b in budgets for g in ("pixel", "channel")]
    # 4 of 7 layers fully linear (16384×2 + 8192 + 4096 removed): 28,672 ReLUs kept, no partial layer
    specs.append(("layers-28672", "layer", None, (0, 1, 3, 5)))
    for name, gran, budget, off in specs:
        for target in ("edge", "pi"):
            t0 = time.time()
            built[f"{name}-{target}"] = build(work, f"{name}-{target}", target, gran, budget, off)
            b = built[f"{name}-{target}"]
            print(f"built {name}-{target}: {b['relus_kept']:,} ReLUs kept, ops {b['ops']} ({time.time() - t0:.0f}s)",
                  flush=True)
    paths = {k: v["onnx"] for k, v in built.items()}
    for k, v in built.items():  # what onnxruntime runs: its optimized graph (NCHWc layout reorders included)
        v["ort_optimized_ops"] = _optimized_ops(v["onnx"], work / f"{k}.opt.onnx")
    lat = {}
    for threads in (1, 2):
        for batch in (1, 64):
            key = f"t{threads}-b{batch}"
            lat[key] = interleaved_latency(paths, threads=threads, batch=batch, repeats=repeats,
                                           inner=a.inner if batch == 1 else 1)
            v = lat[key]["variants"]
            d = v["dense"]["median_ms"]
            lat[key]["ratio_to_dense"] = {k: round(s["median_ms"] / d, 3) for k, s in v.items()}
            print(f"[{key}] dense {d:.3f} ms; " + ", ".join(f"{k} {r:.2f}x" for k, r in lat[key]["ratio_to_dense"].items()
                                                            if k != "dense") + f"  load {lat[key]['loadavg_after']}",
                  flush=True)
    edge_r = {key: {k: r for k, r in l["ratio_to_dense"].items() if k.endswith("-edge")} for key, l in lat.items()}
    pi_r = {key: {k: r for k, r in l["ratio_to_dense"].items() if k.endswith("-pi")} for key, l in lat.items()}
    by_gran = {g: [r for v in edge_r.values() for k, r in v.items() if k.startswith(g)] for g in ("pixel", "channel", "layers")}
    summary = {"edge_max_ratio_to_dense": max(max(v.values()) for v in edge_r.values()),
               "edge_ratio_range_by_granularity": {g: [min(v), max(v)] for g, v in by_gran.items() if v},
               "edge_ratio_range": {key: [min(v.values()), max(v.values())] for key, v in edge_r.items()},
               "pi_ratio_range": {key: [min(v.values()), max(v.values())] for key, v in pi_r.items()},
               "edge_le_dense_everywhere": all(r <= 1.0 for v in edge_r.values() for r in v.values()),
               "edge_faster_than_pi_everywhere": all(lat[key]["ratio_to_dense"][k] <= lat[key]["ratio_to_dense"][k[:-5] + "-pi"]
                                                     for key in lat for k in edge_r[key])}
    res = {"setup": {"model": "resnet8 (73,728 ReLUs, 32x32), random masks of exact budgets; 'layers-28672': layers "
                              "0,1,3,5 fully linear, the rest fully kept", "runtime":
                         "onnxruntime CPUExecutionProvider, default session options (ORT_ENABLE_ALL: fusions + NCHWc layout)",
                     "repeats": repeats, "inner_runs_batch1": a.inner,
                     "method": "interleaved: every repeat runs all variants once in a fresh random order; median and "
                               "IQR over repeats",
                     "session_options": f"{SPINNING_KEY} = 0 in every session: with spinning on, the idle threads of "
                                        "the session that just ran steal the cores of the next one (relucomp/latency.py)",
                     "load_note": "loadavg before/after each setting is recorded; on this 2-core machine the "
                                  "benchmark's own 2-thread runs raise it to about 2"},
           "builds": built, "latency": lat, "summary": summary}
    import onnxruntime

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        res["machine"] = {**machine_info(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                          "loadavg_end": os.getloadavg()}
        res["wall_s"] = round(time.time() - t_start, 1)
        atomic_write_json(out, res)

    write()  # the main result first; the forms study is added when it finishes
    if not a.no_forms:
        res["elementwise_forms"] = elementwise_forms(study_repeats)
        write()
        res["channel_split_forms"] = channel_split_forms(study_repeats)
        write()
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
